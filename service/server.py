"""`vae serve`: load, warm up, serve, drain.

Lifecycle: models are loaded and verified (a bad version is refused with a log
line), the gRPC server starts with health NOT_SERVING, the models are warmed up,
then health turns SERVING. On SIGTERM or SIGINT health turns NOT_SERVING, new
calls are refused, calls in flight get ``--grace-s`` seconds, and the process
exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from vaeserve._proto import vae_pb2, vae_pb2_grpc
from vaeserve.errors import ConfigError
from vaeserve.runtime import usable_cores
from vaeserve.service.auth import BearerTokenInterceptor
from vaeserve.service.heap import keep_freed_heap
from vaeserve.service.metrics import Metrics
from vaeserve.service.models import ModelRegistry
from vaeserve.service.servicer import VaeServicer
from vaeserve.service.settings import ServeSettings
from vaeserve.service.shared_memory import SharedMemoryRegions

log = logging.getLogger("vaeserve.service")
SERVICE_NAME = vae_pb2.DESCRIPTOR.services_by_name["VaeService"].full_name


def grpc_options(settings: ServeSettings) -> list[tuple[str, int]]:
    limit = settings.max_message_mb * 1024 * 1024
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", 1),
    ]


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
    interceptors = []
    token = settings.read_token()
    if token:
        reject = metrics.requests.labels
        interceptors.append(
            BearerTokenInterceptor(token, lambda m: reject(m.rsplit("/", 1)[-1], "UNAUTHENTICATED").inc())
        )
    credentials = server_credentials(settings)
    # One thread per parallel onnxruntime run: more would only take turns on the same cores.
    executor = ThreadPoolExecutor(settings.threads or usable_cores(), thread_name_prefix="onnxruntime")
    registry = ModelRegistry.load(settings, executor, metrics)
    metrics.models.set(len(registry.all()))
    server = grpc.aio.server(
        options=grpc_options(settings),
        interceptors=interceptors,
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    regions = SharedMemoryRegions(settings.shared_memory)
    vae_pb2_grpc.add_VaeServiceServicer_to_server(VaeServicer(registry, metrics, regions), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = _bind(server, f"{settings.host}:{settings.port}", credentials)
    metrics_server = (
        metrics.serve_http(settings.host, settings.metrics_port) if settings.metrics_port else None
    )
    await _set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    registry.start()
    await asyncio.get_running_loop().run_in_executor(executor, _warm_up, registry)
    await _set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "serving %s on %s:%d (%s%s%s), batching %s, shared memory %s; metrics on :%s",
        _describe(registry),
        settings.host,
        port,
        "TLS" if credentials else "plaintext",
        ", mTLS" if settings.tls_client_ca else "",
        ", bearer token" if token else "",
        _batching(settings),
        "on" if settings.shared_memory else "off",
        settings.metrics_port or "off",
    )
    if on_serving is not None:
        on_serving()
    await _until_signalled()
    log.info("shutting down: health NOT_SERVING, draining calls for up to %.1f s", settings.grace_s)
    await health_servicer.enter_graceful_shutdown()
    await server.stop(settings.grace_s)
    await registry.stop()
    regions.close()
    executor.shutdown(wait=True)
    if metrics_server is not None:
        metrics_server.shutdown()
    log.info("stopped")
    return 0


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    try:
        if credentials:
            return server.add_secure_port(address, credentials)
        return server.add_insecure_port(address)
    except RuntimeError:
        raise ConfigError(
            f"--host/--port {address}: cannot listen there (in use, or not an address here)"
        ) from None


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


def repo_exists(path: Path) -> None:
    if not path.is_dir():
        raise ConfigError(f"--repo {path}: no such model repository")
