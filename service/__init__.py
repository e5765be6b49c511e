"""The gRPC service: vae serve."""
