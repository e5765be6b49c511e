"""The gRPC server: its options, and vae.v1, OIP's GRPCInferenceService, health and
reflection registered on it, the hot RPCs reading their tensor bytes in place (service.wire)."""

from __future__ import annotations

from collections.abc import Callable

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from vaeserve._proto import grpc_predict_v2_pb2, vae_pb2
from vaeserve.errors import ConfigError
from vaeserve.service import policy, wire
from vaeserve.service.auth import BearerTokenInterceptor
from vaeserve.service.dataplane import ModelRegistry
from vaeserve.service.metrics import Metrics
from vaeserve.service.oip.endpoints import Catalogue
from vaeserve.service.oip.grpc_servicer import InferenceServicer
from vaeserve.service.oip.repository_extension import RepositoryExtension
from vaeserve.service.settings import ServeSettings
from vaeserve.service.shared_memory import SharedMemoryRegions
from vaeserve.service.vae_servicer import VaeServicer

SERVICE_NAME = vae_pb2.DESCRIPTOR.services_by_name["VaeService"].full_name
OIP_SERVICE_NAME = grpc_predict_v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


# Connections that hold resources without calls: a client that connects and never completes
# the HTTP/2 (or TLS) handshake is dropped after 10 s, one idle for 5 minutes is closed (clients
# reconnect on their own); headers (metadata) are limited to 16 KiB.
HANDSHAKE_TIMEOUT_MS, IDLE_CONNECTION_MS, MAX_METADATA_BYTES = 10_000, 300_000, 16 * 1024
STREAMS_SHARE = 4


def grpc_options(settings: ServeSettings) -> list[tuple[str, int]]:
    limit = settings.max_message_mb * 1024 * 1024
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", 1),
        ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
        ("grpc.max_connection_idle_ms", IDLE_CONNECTION_MS),
        ("grpc.max_metadata_size", MAX_METADATA_BYTES),
        # One connection may hold a quarter of --max-concurrent-rpcs: its further calls wait in
        # its own HTTP/2 flow (the client queues them), so one client cannot take every slot.
        ("grpc.max_concurrent_streams", max(1, settings.max_concurrent_rpcs // STREAMS_SHARE)),
    ]


def grpc_server(
    settings: ServeSettings,
    registry: ModelRegistry,
    catalogue: Catalogue,
    metrics: Metrics,
    tokens: policy.Tokens,
    ready: Callable[[], bool],
    repository: RepositoryExtension,
) -> tuple[grpc.aio.Server, BoundedHealthServicer, SharedMemoryRegions]:
    """vae.v1, OIP's GRPCInferenceService, health and reflection on one server."""
    # Without tokens no interceptor: it would cost every call a coroutine.
    interceptors = [BearerTokenInterceptor(tokens, metrics.refused)] if tokens.any else []
    server = grpc.aio.server(
        options=grpc_options(settings),
        interceptors=interceptors,
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    regions = SharedMemoryRegions(settings.shared_memory, prefix=settings.shared_memory_prefix)
    vae = vae_pb2.DESCRIPTOR.services_by_name["VaeService"]
    add_service(server, VaeServicer(registry, metrics, regions), vae, {"Encode": ENCODE_REQUEST})
    oip = grpc_predict_v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    inference = InferenceServicer(catalogue, metrics, ready, repository)
    add_service(server, inference, oip, {"ModelInfer": INFER_REQUEST})
    health_servicer = BoundedHealthServicer(watch_streams(settings))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services = (SERVICE_NAME, OIP_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(services, server)
    return server, health_servicer, regions


def watch_streams(settings: ServeSettings) -> int:
    """Health Watch streams open at once: a sixteenth of --max-concurrent-rpcs (32 of 512)."""
    return max(1, settings.max_concurrent_rpcs // 16)


class BoundedHealthServicer(health.aio.HealthServicer):
    """grpc.health.v1 with a bound on Watch streams. Health needs no token (probes have none),
    and each Watch holds a slot of --max-concurrent-rpcs for as long as its caller keeps it open:
    unbounded, a stranger's Watch streams would fill them and starve Check (a Kubernetes probe)
    and every data call."""

    def __init__(self, max_watchers: int) -> None:
        super().__init__()
        self.max_watchers, self.watchers = max_watchers, 0

    async def Watch(self, request, context) -> None:  # noqa: N802 - the RPC's name
        if self.watchers >= self.max_watchers:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.max_watchers} health Watch streams are open, the most this server keeps "
                "(a sixteenth of --max-concurrent-rpcs); ask with Check, or close one",
            )
        self.watchers += 1
        try:
            await super().Watch(request, context)
        finally:
            self.watchers -= 1


# The hot RPCs read their tensor bytes in place (service.wire).
ENCODE_REQUEST = wire.tensor_request(
    vae_pb2.EncodeRequest, wire.field_number(vae_pb2.EncodeRequest, "inputs")
)
INFER_REQUEST = wire.repeated_bytes_request(
    grpc_predict_v2_pb2.ModelInferRequest,
    wire.field_number(grpc_predict_v2_pb2.ModelInferRequest, "raw_input_contents"),
)
HANDLERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_service(
    server: grpc.aio.Server, servicer: object, service: ServiceDescriptor, read: dict[str, Callable]
) -> None:
    """What the generated ``add_*Servicer_to_server`` does, except that the methods in ``read``
    take their requests from those functions (service.wire: tensor bytes as views), and every
    response may be a ``wire.Reply``."""
    handlers = {}
    for method in service.methods:
        request = message_factory.GetMessageClass(method.input_type)
        make = HANDLERS[method.client_streaming, method.server_streaming]
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=wire.tolerant(read.get(method.name, request.FromString), request),
            response_serializer=wire.serialize,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    try:
        if credentials:
            return server.add_secure_port(address, credentials)
        return server.add_insecure_port(address)
    except RuntimeError:
        raise ConfigError(
            f"--host/--port {address}: cannot listen there (in use, or not an address here)"
        ) from None
