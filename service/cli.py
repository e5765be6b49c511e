"""`vae serve`: every flag also a VAESERVE_* environment variable, for containers."""

from __future__ import annotations

import argparse
import asyncio
import logging

from vaeserve.flags import add_dataclass_flags, values
from vaeserve.service.settings import ENV_PREFIX, ServeSettings


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
    from vaeserve.service.server import repo_exists, serve

    settings = ServeSettings(**values(args, ServeSettings)).validate()
    repo_exists(settings.repo)
    logging.getLogger("vaeserve").info("starting vae serve with %s", settings)
    return asyncio.run(serve(settings))
