"""Writes that never leave a half-written file that looks complete.

Content goes to a temporary file in the destination's folder (same file system),
is flushed to disk, then renamed over the destination in one step (POSIX rename
is atomic). A crash leaves at worst a ``.tmp-*`` file, never a torn destination.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(destination: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``destination`` atomically."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{destination.name}.", dir=destination.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, destination)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_text(destination: Path, text: str) -> None:
    with atomic_path(destination) as tmp:
        tmp.write_text(text)
