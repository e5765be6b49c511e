"""`vae serve`: every flag also a VAESERVE_* environment variable, for containers."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

from vaeserve.errors import ConfigError
from vaeserve.flags import add_dataclass_flags, values
from vaeserve.service.settings import ENV_PREFIX, ServeSettings

T = TypeVar("T")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve exported models over gRPC (Encode, Decode, Reconstruct, SamplePrior)",
        description="Serve the model repository over gRPC on onnxruntime, with health checking, "
        "reflection, Prometheus metrics, batching across requests and graceful shutdown.",
    )
    add_dataclass_flags(parser, ServeSettings, env_prefix=ENV_PREFIX)
    parser.set_defaults(handler=serve_command, default_log_level="INFO")


def serve_command(args: argparse.Namespace) -> int:
    from vaeserve.service.server import refuse_a_stray_server, repo_exists, serve
    from vaeserve.service.store import served_from_store

    warn_unknown_variables(os.environ)
    settings = ServeSettings(**values(args, ServeSettings)).validate().with_workers()
    settings.read_token(), settings.read_admin_token()  # a bad token file fails here, not in each worker
    refuse_a_stray_server(settings)
    logging.getLogger("vaeserve").info("starting vae serve with %s", settings)
    with served_from_store(settings) as settings:
        repo_exists(settings.folder)
        if settings.workers > 1:
            from vaeserve.service.workers import run_workers

            return run_workers(settings)
        return run_on_event_loop(serve(settings), settings.event_loop)


# VAESERVE_* variables read elsewhere than by vae serve's flags: the download cache, the log
# level, vae health's CA, the workers' plumbing, the tests' and compose's own settings.
OTHER_VARIABLES = {
    "CACHE_DIR", "LOG_LEVEL", "HEALTH_TLS_CA", "SUPERVISOR_PID", "CONTROL_DIR", "TEST_MNIST",
    "FUZZ_EXAMPLES", "TAG", "PUBLISHED_PORT", "PUBLISHED_HTTP_PORT", "PUBLISHED_METRICS_PORT",
}  # fmt: skip


def warn_unknown_variables(environ: Mapping[str, str]) -> None:
    """A misspelt VAESERVE_* variable would be ignored in silence: one warning, naming the
    closest variable that is read."""
    import difflib

    known = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(ServeSettings)}
    known |= {ENV_PREFIX + name for name in OTHER_VARIABLES}
    for name in sorted(n for n in environ if n.startswith(ENV_PREFIX) and n not in known):
        close = difflib.get_close_matches(name, sorted(known), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        logging.getLogger("vaeserve").warning("ignoring %s: vae serve reads no such variable%s", name, hint)


def run_on_event_loop(main: Coroutine[Any, Any, T], choice: str) -> T:
    """Run the server on uvloop when chosen or (auto) installed, else on asyncio's loop."""
    log = logging.getLogger("vaeserve.service")
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ConfigError("--event-loop uvloop: uvloop is not installed") from None
        else:
            log.info("event loop: uvloop %s", uvloop.__version__)
            return uvloop.run(main)
    log.info("event loop: asyncio")
    return asyncio.run(main)


def register_health(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "health",
        help="ask a server's gRPC health service (exit 0 when SERVING)",
        description="Standard grpc.health.v1 check, as Docker's HEALTHCHECK and orchestrators run it.",
    )
    port = os.environ.get(f"{ENV_PREFIX}PORT", "50051")
    parser.add_argument(
        "--target",
        default=f"127.0.0.1:{port}",
        help=f"HOST:PORT of the server (default 127.0.0.1:${ENV_PREFIX}PORT, else 50051)",
    )
    parser.add_argument("--service", default="", help="service to check (default: the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds before one check gives up")
    parser.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="keep asking until SERVING or SECONDS pass (a server still starting up); default: ask once",
    )
    parser.add_argument(
        "--tls-ca",
        type=Path,
        default=os.environ.get(f"{ENV_PREFIX}HEALTH_TLS_CA"),
        help=f"PEM CA to verify a TLS server (env {ENV_PREFIX}HEALTH_TLS_CA)",
    )
    parser.set_defaults(handler=health_command)


def health_failure(exc, service: str) -> str:
    """gRPC's health service answers NOT_FOUND, with no details, for a service it does not know."""
    import grpc

    from vaeserve._proto import vae_pb2

    service_name = vae_pb2.DESCRIPTOR.services_by_name["VaeService"].full_name
    if exc.code == grpc.StatusCode.NOT_FOUND and not exc.details:
        return (
            f"NOT_FOUND: the server reports no health for service {service!r}; it reports it for "
            f"'' (the whole server, the default) and {service_name!r}"
        )
    return str(exc)


def health_command(args: argparse.Namespace) -> int:
    from vaeserve.client import ServiceError, VaeClient

    with VaeClient(args.target, timeout=args.timeout, root_certificates=args.tls_ca) as client:
        try:
            status = client.poll_health(args.wait, args.service)
        except ServiceError as exc:
            print(f"{args.target}: {health_failure(exc, args.service)}")
            return 1
    print(f"{args.target}: {status}")
    return 0 if status == "SERVING" else 1
