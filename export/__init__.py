"""Export stage: a checkpoint becomes separate encoder and decoder ONNX graphs plus a
manifest, checked, then placed atomically in a versioned model repository."""
