"""Checksummed, cached downloads of the standard dataset files, through pooch.

pooch downloads into a temporary file beside the target and renames it into the
cache only once its SHA-256 matches, so the cache never holds a bad file; on
every later use it verifies the hash again before handing the path back.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from vaeserve.errors import DatasetUnavailableError, MissingExtraError, first_line

log = logging.getLogger(__name__)

CACHE_ENV = "VAESERVE_CACHE_DIR"


@dataclass(frozen=True)
class RemoteFile:
    """A file of a dataset as the mirrors serve it, with the SHA-256 they publish."""

    name: str
    sha256: str


def default_cache_dir() -> Path:
    """``$VAESERVE_CACHE_DIR``, else the user's cache folder (``~/.cache/vaeserve``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.path.expanduser("~/.cache")) / "vaeserve"


def fetch(file: RemoteFile, mirrors: tuple[str, ...], folder: Path, progress: bool = True) -> Path:
    """The verified local copy of ``file``, downloaded from the first mirror that serves it."""
    try:
        import pooch
        import requests
    except ImportError as exc:
        raise MissingExtraError("downloading datasets", "train", exc.name or "pooch") from None
    failures = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + file.name
        try:
            path = pooch.retrieve(
                url,
                known_hash=f"sha256:{file.sha256}",
                fname=file.name,
                path=folder,
                progressbar=progress,
            )
            return Path(path)
        except ValueError as exc:  # pooch: the SHA-256 did not match; the file was discarded
            failures.append(f"{url}: checksum mismatch ({first_line(exc)})")
        except requests.RequestException as exc:
            failures.append(f"{url}: {type(exc).__name__}")
        except OSError as exc:
            failures.append(f"{url}: {exc.strerror or exc}")
    raise DatasetUnavailableError(
        f"cannot download {file.name} (offline or mirrors unreachable: {'; '.join(failures)}); "
        f"pass --data-dir DIR holding the IDX files, or put them in {folder}"
    )
