"""Command-line flags: those generated from a config dataclass, and the dataset flags commands share.

Each field ``some_name`` becomes ``--some-name``, with its help, choices and type
taken from the field, so a dataclass stays the single source of defaults. With
``env_prefix`` every flag can also come from ``{PREFIX}SOME_NAME``, for containers.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any

from vaeserve.errors import ConfigError


def option(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field with the help text and choices its flag shows."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def env_name(prefix: str, field: str) -> str:
    return prefix + field.upper()


def add_dataclass_flags(
    parser: argparse._ActionsContainer, cls: type, env_prefix: str | None = None, show_default_of: Any = None
) -> None:
    """One flag per field. Without ``env_prefix`` flags default to None (meaning: not given)."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kind, optional = _unwrap(hints[field.name])
        options: dict[str, Any] = {"help": field.metadata["help"]}
        if field.metadata.get("choices"):
            options["choices"] = field.metadata["choices"]
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is tuple:
            options.update(type=typing.get_args(kind)[0], nargs="+", metavar="N")
        else:
            options.update(type=kind, metavar=field.name.split("_")[-1].upper())
        if env_prefix is None:
            options["default"] = None
            shown = None if show_default_of is None else getattr(show_default_of, field.name)
            # A help text that says what unset means already (or a default of None) gets no second.
            if shown is not None and "(default:" not in options["help"]:
                options["help"] += f" (default: {shown})"
        else:
            variable = env_name(env_prefix, field.name)
            options["default"] = _from_env(variable, kind, optional, field)
            options["help"] += f" [env {variable}; default: {_describe(field)}]"
        parser.add_argument("--" + field.name.replace("_", "-"), **options)


def values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}


def _unwrap(kind: Any) -> tuple[Any, bool]:
    """``X | None`` → (X, True)."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return args[0], True
    return kind, False


def _describe(field: dataclasses.Field) -> str:
    return "unset" if field.default is None else str(field.default)


def _from_env(variable: str, kind: Any, optional: bool, field: dataclasses.Field) -> Any:
    raw = os.environ.get(variable)
    if raw is None or raw == "":
        return field.default
    try:
        if kind is bool:
            if raw.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes", "on")
        if kind is Path:
            return Path(raw)
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"environment variable {variable}={raw!r} is not a valid {kind.__name__}") from None
    choices = field.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"environment variable {variable}={raw!r}; expected one of {', '.join(choices)}")
    return value


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="read the dataset's IDX files (raw or .gz) from DIR instead of the download cache",
    )
    parser.add_argument(
        "--cache-dir", type=Path, help="download cache (default $VAESERVE_CACHE_DIR or ~/.cache/vaeserve)"
    )
