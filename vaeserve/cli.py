"""The `vae` command: one entry point whose subcommands are the stages.

Each stage's ``cli`` module registers its subcommands and imports its heavy
dependencies (torch, onnx) only when one runs. User errors (``VaeError``) end
as one line on stderr and a non-zero exit; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import NoReturn

from vaeserve import __version__
from vaeserve.atomic import DISK_FULL
from vaeserve.errors import VaeError

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the command, not the whole usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from vaeserve import bench, demo
    from vaeserve.embed import cli as embed_cli
    from vaeserve.export import cli as export_cli
    from vaeserve.service import cli as service_cli
    from vaeserve.training import cli as training_cli

    parser = OneLineParser(prog="vae", description="Train, export and serve a variational autoencoder.")
    parser.add_argument("--version", action="version", version=f"vaeserve {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("VAESERVE_LOG_LEVEL"),
        choices=LOG_LEVELS,
        help="logging level (env VAESERVE_LOG_LEVEL; default INFO for serve, else WARNING)",
    )
    subparsers = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=OneLineParser
    )
    training_cli.register(subparsers)
    training_cli.register_evaluate(subparsers)
    export_cli.register(subparsers)
    export_cli.register_triton(subparsers)
    export_cli.register_import(subparsers)
    export_cli.register_label(subparsers)
    export_cli.register_traffic(subparsers)
    service_cli.register(subparsers)
    service_cli.register_health(subparsers)
    demo.register(subparsers)
    embed_cli.register(subparsers)
    embed_cli.register_score(subparsers)
    bench.register(subparsers)
    for command in subparsers.choices.values():  # also after the command: vae serve --log-level DEBUG
        command.add_argument(
            "--log-level", default=argparse.SUPPRESS, choices=LOG_LEVELS, help="as vae --log-level"
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = args.log_level or getattr(args, "default_log_level", "WARNING")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except VaeError as exc:
        print(f"vae {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        where = f" (writing {exc.filename})" if exc.filename else ""
        print(f"vae {args.command}: error: no space left on the device{where}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt as exc:
        # What is kept is the command's to say: the note its job left on the interrupt, or its
        # own account (a command registers ``interrupted``), else nothing is claimed.
        said = getattr(args, "interrupted", None)
        note = exc.args[0] if exc.args else (said(args) if said else "")
        print(f"vae {args.command}: interrupted" + (f"; {note}" if note else ""), file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
