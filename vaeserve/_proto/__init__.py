"""Python stubs of protos/vae/v1/vae.proto, generated at build/install time by setup.py
(``vae_pb2.py``, ``vae_pb2_grpc.py``); they are not checked in."""

try:
    from vaeserve._proto import vae_pb2, vae_pb2_grpc
except ImportError as exc:  # a source checkout that was never installed
    raise ImportError(
        "vaeserve's gRPC stubs are not generated: install the project (pip install -e .), "
        "which runs grpc_tools.protoc on protos/vae/v1/vae.proto"
    ) from exc

__all__ = ["vae_pb2", "vae_pb2_grpc"]
