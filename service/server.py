"""`vae serve`: load, warm up, serve, drain.

Lifecycle: models are loaded and verified (a bad version is refused with a log
line), the gRPC server (vae.v1 and the Open Inference Protocol) and the OIP HTTP
server start with health NOT_SERVING, the models are warmed up, then health turns
SERVING. On SIGTERM or SIGINT health turns NOT_SERVING, new calls are refused on
both ports, calls in flight get ``--grace-s`` seconds, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import grpc
from aiohttp import web
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from vaeserve._proto import grpc_predict_v2_pb2, vae_pb2
from vaeserve.errors import ConfigError
from vaeserve.runtime import usable_cores
from vaeserve.service import wire
from vaeserve.service.auth import BearerTokenInterceptor
from vaeserve.service.heap import keep_freed_heap
from vaeserve.service.live import LiveRepository
from vaeserve.service.metrics import Metrics
from vaeserve.service.models import ModelRegistry
from vaeserve.service.oip.grpc_servicer import InferenceServicer
from vaeserve.service.oip.http_app import bound_port, create_app, start_http
from vaeserve.service.oip.models import Catalogue, Control
from vaeserve.service.servicer import VaeServicer
from vaeserve.service.settings import ServeSettings
from vaeserve.service.shared_memory import SharedMemoryRegions
from vaeserve.service.workers import WORKER_ENV

log = logging.getLogger("vaeserve.service")
SERVICE_NAME = vae_pb2.DESCRIPTOR.services_by_name["VaeService"].full_name
OIP_SERVICE_NAME = grpc_predict_v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


# Connections that hold resources without calls: a client that connects and never completes
# the HTTP/2 (or TLS) handshake is dropped after 10 s, one idle for 5 minutes is closed (clients
# reconnect on their own); headers (metadata) are limited to 16 KiB.
HANDSHAKE_TIMEOUT_MS, IDLE_CONNECTION_MS, MAX_METADATA_BYTES = 10_000, 300_000, 16 * 1024


def grpc_options(settings: ServeSettings) -> list[tuple[str, int]]:
    limit = settings.max_message_mb * 1024 * 1024
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", 1),
        ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
        ("grpc.max_connection_idle_ms", IDLE_CONNECTION_MS),
        ("grpc.max_metadata_size", MAX_METADATA_BYTES),
    ]


def http_ssl_context(settings: ServeSettings) -> ssl.SSLContext | None:
    """The HTTP port's TLS (and mTLS) from the same files as gRPC's."""
    if settings.tls_cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
        if settings.tls_client_ca:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(settings.tls_client_ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS files for the HTTP port: {exc}") from None
    return context


def server_credentials(settings: ServeSettings) -> grpc.ServerCredentials | None:
    if settings.tls_cert is None:
        return None
    try:
        key, cert = settings.tls_key.read_bytes(), settings.tls_cert.read_bytes()
        client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    except OSError as exc:
        raise ConfigError(f"cannot read TLS file {exc.filename} ({exc.strerror})") from None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


async def serve(settings: ServeSettings, on_serving: Callable[[], None] | None = None) -> int:
    keep_freed_heap(settings.heap_keep_mb)
    metrics = Metrics()
    token, admin_token = settings.read_token(), settings.read_admin_token()
    credentials = server_credentials(settings)
    # One thread per parallel onnxruntime run: more would only take turns on the same cores.
    executor = ThreadPoolExecutor(settings.threads or usable_cores(), thread_name_prefix="onnxruntime")
    registry = ModelRegistry.load(settings, executor, metrics)
    metrics.models.set(len(registry.all()))
    serving = asyncio.Event()  # set once warmed up, cleared when draining: OIP's readiness
    catalogue = Catalogue(registry)  # the models as the Open Inference Protocol names them
    live = LiveRepository(settings, registry, executor, metrics, metrics)
    if live.control is not None:  # a worker (perhaps a restarted one) follows the operators' changes
        await live.follow_control()
    control = Control(live, admin_token is not None, settings.repo.name)
    access = Access(token, admin_token, serving.is_set, control)
    server, health_servicer, regions = _grpc_server(settings, registry, catalogue, metrics, access)
    port = _bind(server, f"{settings.host}:{settings.port}", credentials)
    http = await _start_http(settings, catalogue, metrics, access)
    metrics_server = (
        metrics.serve_http(settings.host, settings.metrics_port) if settings.metrics_port else None
    )
    await _set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    registry.start()
    await asyncio.get_running_loop().run_in_executor(executor, _warm_up, registry)
    serving.set()
    await _set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING)
    following = _follow(live)
    log.info(
        "serving %s on %s: gRPC (vae.v1, OIP) on :%d, OIP HTTP on :%s (%s%s%s), batching %s, "
        "shared memory %s, repository %s, model control %s; %s",
        _describe(registry),
        settings.host,
        port,
        bound_port(http) if http else "off",
        "TLS" if credentials else "plaintext",
        ", mTLS" if settings.tls_client_ca else "",
        ", bearer token" if token else "",
        _batching(settings),
        "on" if settings.shared_memory else "off",
        f"polled every {settings.poll_s:g} s" if settings.poll_s else "loaded once",
        "on (admin token)" if admin_token else "off",
        _metrics_where(settings),
    )
    if on_serving is not None:
        on_serving()
    await _until_signalled()
    log.info("shutting down: health NOT_SERVING, draining calls for up to %.1f s", settings.grace_s)
    serving.clear()
    if following is not None:
        following.cancel()
    await health_servicer.enter_graceful_shutdown()
    await asyncio.gather(server.stop(settings.grace_s), http.cleanup() if http else asyncio.sleep(0))
    await registry.stop()
    regions.close()
    executor.shutdown(wait=True)
    if metrics_server is not None:
        metrics_server.shutdown()
    log.info("stopped")
    return 0


def _follow(live: LiveRepository) -> asyncio.Task | None:
    """With --poll-s, or as a worker that must follow the others' hand-made changes, a task that
    keeps the served versions in step with the repository."""
    if not live.settings.poll_s and live.control is None:
        return None
    return asyncio.get_running_loop().create_task(live.run())


class Access(NamedTuple):
    """Who may call what: the clients' and the operators' tokens, readiness, model control."""

    token: str | None
    admin_token: str | None
    ready: Callable[[], bool]
    control: Control


def _grpc_server(
    settings: ServeSettings, registry: ModelRegistry, catalogue: Catalogue, metrics: Metrics, access: Access
) -> tuple[grpc.aio.Server, health.aio.HealthServicer, SharedMemoryRegions]:
    """vae.v1, OIP's GRPCInferenceService, health and reflection on one server."""
    # Without tokens no interceptor: it would cost every call a coroutine.
    interceptors = (
        [BearerTokenInterceptor(access.token, access.admin_token, metrics.refused)]
        if access.token or access.admin_token
        else []
    )
    server = grpc.aio.server(
        options=grpc_options(settings),
        interceptors=interceptors,
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    regions = SharedMemoryRegions(settings.shared_memory, prefix=settings.shared_memory_prefix)
    vae = vae_pb2.DESCRIPTOR.services_by_name["VaeService"]
    add_service(server, VaeServicer(registry, metrics, regions), vae, {"Encode": ENCODE_REQUEST})
    oip = grpc_predict_v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    inference = InferenceServicer(catalogue, metrics, access.ready, access.control)
    add_service(server, inference, oip, {"ModelInfer": INFER_REQUEST})
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services = (SERVICE_NAME, OIP_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(services, server)
    return server, health_servicer, regions


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


async def _start_http(
    settings: ServeSettings, catalogue: Catalogue, metrics: Metrics, access: Access
) -> web.AppRunner | None:
    if not settings.http_port:
        return None
    app = create_app(
        catalogue,
        metrics,
        access.ready,
        access.token,
        max_body_bytes=settings.max_message_mb * 1024 * 1024,
        max_in_flight=settings.max_concurrent_rpcs,
        control=access.control,
        admin_token=access.admin_token,
    )
    return await start_http(
        app,
        settings.host,
        settings.http_port,
        http_ssl_context(settings),
        grace_s=settings.grace_s,
        idle_s=settings.http_idle_s,
    )


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    try:
        if credentials:
            return server.add_secure_port(address, credentials)
        return server.add_insecure_port(address)
    except RuntimeError:
        raise ConfigError(
            f"--host/--port {address}: cannot listen there (in use, or not an address here)"
        ) from None


def _metrics_where(settings: ServeSettings) -> str:
    if os.environ.get(WORKER_ENV):
        return "metrics served by the supervisor"
    return f"metrics on :{settings.metrics_port}" if settings.metrics_port else "metrics off"


def _warm_up(registry: ModelRegistry) -> None:
    for model in registry.all():
        model.warm_up()


async def _set_health(servicer: health.aio.HealthServicer, status: int) -> None:
    for name in ("", SERVICE_NAME):
        await servicer.set(name, status)


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


def _describe(registry: ModelRegistry) -> str:
    parts = [f"{m.version.name}/{m.version.version} on {m.pair.provider}" for m in registry.all()]
    return ", ".join(parts) + f" (default {registry.default})"


def _batching(settings: ServeSettings) -> str:
    if not settings.batching:
        return "off"
    return f"up to {settings.batch_max_rows} rows, max delay {settings.batch_max_delay_ms} ms"


def refuse_a_stray_server(settings: ServeSettings) -> None:
    """SO_REUSEPORT lets a second server bind a port in use and take a share of its connections
    unnoticed: refuse to start when one already answers there (the supervisor's own workers
    share its port on purpose and skip this)."""
    if os.environ.get(WORKER_ENV):
        return
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(settings.host, settings.host)
    for flag, port in (("--port", settings.port), ("--http-port", settings.http_port)):
        if not port:
            continue
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            raise ConfigError(
                f"{flag} {port}: another server already listens there (this one would share its "
                "connections silently); stop it or choose another port"
            )


def repo_exists(path: Path) -> None:
    if not path.is_dir():
        raise ConfigError(f"--repo {path}: no such model repository")
