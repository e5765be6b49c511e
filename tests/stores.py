"""The object store of the tests: vaeserve.sandbox's SeaweedFS, with this process's environment
pointing at it, skipped in one line where it cannot start."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from vaeserve.sandbox import S3Store, start_seaweedfs


@contextlib.contextmanager
def store_for_tests(folder: Path, cache: Path) -> Iterator[S3Store]:
    """SeaweedFS, with this process's environment pointing at it (the standard AWS variables
    only) and a model cache of its own; pytest skips, in one line, where it cannot start."""
    import pytest

    try:
        store = start_seaweedfs(folder)
    except (FileNotFoundError, RuntimeError) as exc:
        pytest.skip(f"no S3-compatible server starts here ({str(exc).splitlines()[0]})")
    env = {**store.env, "VAESERVE_CACHE_DIR": str(cache)}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield store
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        store.stop()
