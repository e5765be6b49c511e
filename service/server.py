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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2

from vaeserve.errors import ConfigError
from vaeserve.runtime import usable_cores
from vaeserve.service import policy, tracing
from vaeserve.service.console.routes import Console
from vaeserve.service.dataplane import ModelRegistry
from vaeserve.service.grpc_server import SERVICE_NAME, bind, grpc_server
from vaeserve.service.heap import keep_freed_heap
from vaeserve.service.manager import ModelManager
from vaeserve.service.metrics import Metrics
from vaeserve.service.oip.endpoints import Catalogue
from vaeserve.service.oip.http_app import BrowserPolicy, bound_port, create_app, start_http
from vaeserve.service.oip.repository_extension import RepositoryExtension
from vaeserve.service.settings import ServeSettings
from vaeserve.service.shared_memory import SharedMemoryRegions
from vaeserve.service.tls import http_ssl_context, server_credentials
from vaeserve.service.workers import WORKER_ENV

log = logging.getLogger("vaeserve.service")


@dataclass
class Running:
    """What ``serve`` started, to stop in order."""

    executor: ThreadPoolExecutor
    manager: ModelManager
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    regions: SharedMemoryRegions
    http: web.AppRunner | None
    metrics_server: object | None
    port: int


async def serve(settings: ServeSettings, on_serving: Callable[[], None] | None = None) -> int:
    keep_freed_heap(settings.heap_keep_mb)
    serving = asyncio.Event()  # set once warmed up, cleared when draining: OIP's readiness
    running = await _start(settings, serving)
    await running.server.start()
    running.manager.registry.start()
    await asyncio.get_running_loop().run_in_executor(running.executor, running.manager.warm_up)
    serving.set()
    await _set_health(running.health, health_pb2.HealthCheckResponse.SERVING)
    following = (
        asyncio.get_running_loop().create_task(running.manager.run()) if running.manager.following() else None
    )
    _log_serving(settings, running)
    if on_serving is not None:
        on_serving()
    await _until_signalled()
    log.info("shutting down: health NOT_SERVING, draining calls for up to %.1f s", settings.grace_s)
    serving.clear()
    if following is not None:
        following.cancel()
    await _stop(settings, running)
    log.info("stopped")
    return 0


async def _start(settings: ServeSettings, serving: asyncio.Event) -> Running:
    """Models loaded and verified, both ports bound, health NOT_SERVING."""
    metrics = Metrics()
    traces = tracing.configure()  # OTEL_TRACES_EXPORTER and the SDK's other variables; off if unset
    if traces:
        log.info(traces)
    token, admin_token = settings.read_token(), settings.read_admin_token()
    tokens = policy.Tokens(token, admin_token)
    credentials = server_credentials(settings)
    # One thread per parallel onnxruntime run: more would only take turns on the same cores.
    executor = ThreadPoolExecutor(settings.threads or usable_cores(), thread_name_prefix="onnxruntime")
    manager = ModelManager(settings, executor, metrics)
    if manager.shared_unloads is not None:  # a worker (perhaps a restarted one) follows the operators
        await manager.follow_shared_unloads()
    catalogue = Catalogue(manager.registry)  # the models as the Open Inference Protocol names them
    repository = RepositoryExtension(manager, admin_token is not None, settings.folder.name)
    server, health_servicer, regions = grpc_server(
        settings, manager.registry, catalogue, metrics, tokens, serving.is_set, repository
    )
    port = bind(server, f"{settings.host}:{settings.port}", credentials)
    console = Console(manager, metrics, page=settings.console)
    http = await _start_http(settings, catalogue, metrics, tokens, serving.is_set, repository, console)
    metrics_server = (
        metrics.serve_http(settings.host, settings.metrics_port) if settings.metrics_port else None
    )
    await _set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
    return Running(executor, manager, server, health_servicer, regions, http, metrics_server, port)


async def _stop(settings: ServeSettings, running: Running) -> None:
    """Refuse new calls on both ports, give those in flight --grace-s, release the rest."""
    await running.health.enter_graceful_shutdown()
    http = running.http
    await asyncio.gather(running.server.stop(settings.grace_s), http.cleanup() if http else asyncio.sleep(0))
    await running.manager.registry.stop()
    running.regions.close()
    running.executor.shutdown(wait=True)
    if running.metrics_server is not None:
        running.metrics_server.shutdown()
    tracing.shutdown()  # the spans still buffered are exported


def _log_serving(settings: ServeSettings, running: Running) -> None:
    log.info(
        "serving %s on %s: gRPC (vae.v1, OIP) on :%d, OIP HTTP on :%s (%s%s%s), batching %s, "
        "shared memory %s, repository %s, model control %s, web console %s; %s",
        _describe(running.manager.registry),
        settings.host,
        running.port,
        bound_port(running.http) if running.http else "off",
        "TLS" if settings.tls_cert else "plaintext",
        ", mTLS" if settings.tls_client_ca else "",
        ", bearer token" if settings.token_file else "",
        _batching(settings),
        "on" if settings.shared_memory else "off",
        f"polled every {settings.poll_s:g} s" if settings.poll_s else "loaded once",
        "on (admin token)" if settings.admin_token_file else "off",
        f"at / on :{bound_port(running.http)}" if settings.console and running.http else "off",
        _metrics_where(settings),
    )


async def _start_http(
    settings: ServeSettings,
    catalogue: Catalogue,
    metrics: Metrics,
    tokens: policy.Tokens,
    ready: Callable[[], bool],
    repository: RepositoryExtension,
    console: Console,
) -> web.AppRunner | None:
    if not settings.http_port:
        return None
    app = create_app(
        catalogue,
        metrics,
        ready,
        tokens,
        max_body_bytes=settings.max_message_mb * 1024 * 1024,
        max_in_flight=settings.max_concurrent_rpcs,
        repository=repository,
        console=console,
        body_idle_s=settings.http_idle_s,
        browsers=BrowserPolicy.of(settings.allowed_hosts, settings.host),
    )
    return await start_http(
        app,
        settings.host,
        settings.http_port,
        http_ssl_context(settings),
        grace_s=settings.grace_s,
        idle_s=settings.http_idle_s,
    )


def _metrics_where(settings: ServeSettings) -> str:
    if os.environ.get(WORKER_ENV):
        return "metrics served by the supervisor"
    return f"metrics on :{settings.metrics_port}" if settings.metrics_port else "metrics off"


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
    parts = [f"{m.version.name}/{m.version.version} on {m.provider}" for m in registry.all()]
    default = registry.default or "none: requests name their model"
    return ", ".join(parts) + f" (default {default})"


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
