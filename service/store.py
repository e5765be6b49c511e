"""`vae serve --repo s3://...`: the store's verified local copy, kept in step while serving.

The first copy is made before anything starts (a store that cannot be listed stops the start
with its error); with ``--poll-s`` a thread of the supervisor (or of the lone server) syncs it
every period, and the workers' managers follow the local folder as they follow any folder:
new versions loaded, removed ones retired (never the last), labels followed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

from vaeserve.errors import StorageError
from vaeserve.remote_repository import RepositoryMirror
from vaeserve.service.settings import ServeSettings
from vaeserve.storage import location

log = logging.getLogger("vaeserve.service")


@contextlib.contextmanager
def served_from_store(settings: ServeSettings) -> Iterator[ServeSettings]:
    """The settings to serve with: unchanged for a folder; for a store, its local copy's."""
    store = location(settings.repo)
    if isinstance(store, Path):
        yield settings
        return
    mirror = RepositoryMirror(store)
    mirror.sync()
    log.info("serving %s from its verified local copy %s", store, mirror.folder)
    stop = threading.Event()
    if settings.poll_s > 0:
        threading.Thread(
            target=_follow, args=(mirror, settings.poll_s, stop), name="store-sync", daemon=True
        ).start()
    try:
        yield dataclasses.replace(settings, repo=str(mirror.folder))
    finally:
        stop.set()


def _follow(mirror: RepositoryMirror, period_s: float, stop: threading.Event) -> None:
    failing = False
    while not stop.wait(period_s):
        try:
            mirror.sync()
        except StorageError as exc:
            if not failing:  # said once per outage; the local copy keeps serving
                log.warning("cannot sync %s (serving the local copy): %s", mirror.root, exc)
            failing = True
            continue
        if failing:
            log.info("%s reachable again", mirror.root)
        failing = False
