"""Training stage: fits the PyTorch VAE on a dataset and evaluates it honestly."""
