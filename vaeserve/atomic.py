"""Writes that never leave a half-written file that looks complete.

Content goes to a temporary file in the destination's folder (same file system),
is flushed to disk, then renamed over the destination in one step (POSIX rename
is atomic). A crash leaves at worst a ``.tmp-*`` file, never a torn destination.

``tempfile`` makes its files 0600 and folders 0700, right for secrets and wrong for what
we publish: a model version exported by one user must be servable by another (the image's
uid, a pod's ``runAsUser``). So what we rename into place gets the modes ``open`` and
``mkdir`` would have given it: 0666 and 0777 less the umask.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from vaeserve.errors import DiskFullError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``os.umask`` sets
    it, for a moment, for every thread)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish_mode(path: Path) -> None:
    """Give a file or folder that ``tempfile`` made the modes of an ordinary new one."""
    full = 0o777 if path.is_dir() else 0o666
    os.chmod(path, full & ~current_umask())


def staging_dir(prefix: str, parent: Path) -> Path:
    """A fresh, uniquely named folder in ``parent``, with the modes of an ordinary new one."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    publish_mode(path)
    return path


@contextlib.contextmanager
def disk_full_said(folder: Path) -> Iterator[None]:
    """A write that finds the device (or the quota) full is a DiskFullError naming the folder:
    one line for the user, where the OSError may name no file at all."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        raise DiskFullError(f"no space left on the device holding {folder}") from None


@contextlib.contextmanager
def atomic_path(destination: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``destination`` atomically."""
    with disk_full_said(destination.parent):
        destination.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{destination.name}.", dir=destination.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            yield tmp_path
            with open(tmp_path, "rb+") as handle:
                os.fsync(handle.fileno())
            publish_mode(tmp_path)
            os.replace(tmp_path, destination)
        finally:
            tmp_path.unlink(missing_ok=True)


def atomic_write_text(destination: Path, text: str) -> None:
    with atomic_path(destination) as tmp:
        tmp.write_text(text)
