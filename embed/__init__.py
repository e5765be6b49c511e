"""Embedding stage: `vae embed` turns whole datasets into latent means (and stddevs),
streamed in chunks, resumable, in-process or through the gRPC service."""
