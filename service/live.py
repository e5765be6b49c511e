"""`vae serve --poll-s`: the served versions follow the repository folder while the server runs.

Every ``poll_s`` seconds the repository is scanned, and the registry moves towards what it holds:

- a new version (an export's atomic rename is what makes it appear: staging folders are not
  versions) is loaded and verified exactly as at start, warmed up, and only then added, so
  ``latest`` moves to it once it is ready;
- a version whose folder is gone is retired: new calls stop reaching it, calls in flight finish
  with it, and its sessions are released with the last reference. A model's last loaded version
  and a version a label points at are kept (with one log line) rather than serving none;
- with ``--version latest`` a newer version replaces the one served, once it is ready;
- a version that fails verification is refused with one log line and not tried again until its
  folder changes; what was served stays served;
- each model's ``labels.json`` is read again; a label naming a version that is not loaded is
  refused with one log line, and the labels in effect stay.

Every worker of ``--workers`` polls on its own and reaches the same set. Metrics count loads,
refusals and retirements (``vaeserve_repository_events_total``).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from pathlib import Path

from vaeserve.errors import RepositoryError
from vaeserve.repository import LABELS, MANIFEST, model_names, read_labels
from vaeserve.service.batching import Observer
from vaeserve.service.metrics import Metrics
from vaeserve.service.models import ModelRegistry, ServedModel, load_one, wanted_versions
from vaeserve.service.settings import ServeSettings

log = logging.getLogger("vaeserve.service")


class RepositoryWatcher:
    def __init__(
        self,
        settings: ServeSettings,
        registry: ModelRegistry,
        executor: Executor,
        metrics: Metrics,
        observer: Observer,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.executor = executor
        self.metrics = metrics
        self.observer = observer
        # Versions refused, by folder, with the signature they were refused at: tried again
        # only once the folder changes. The same for labels files, and for kept versions.
        self.refused: dict[Path, tuple] = {}
        self.reported: dict[str, object] = {}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_s)
            try:
                await self.poll()
            except Exception:  # a poll must never take the server down
                log.exception("repository poll failed; serving what was loaded")

    async def poll(self) -> None:
        """One pass: load what is new, retire what is gone, follow the labels."""
        found = await asyncio.get_running_loop().run_in_executor(self.executor, self._scan)
        for name, numbers in found.items():
            for number in numbers:
                if number not in self.registry.models.get(name, {}):
                    await self._load(name, number)
        for name in list(self.registry.models):
            self._retire_gone(name, set(found.get(name, [])))
            self._follow_labels(name)

    def _scan(self) -> dict[str, list[int]]:
        names = [self.settings.model] if self.settings.model else model_names(self.settings.repo)
        return {name: wanted_versions(self.settings, name) for name in names}

    async def _load(self, name: str, number: int) -> None:
        path = self.settings.repo / name / str(number)
        signature = _signature(path)
        if self.refused.get(path) == signature:
            return
        loop = asyncio.get_running_loop()
        served = await loop.run_in_executor(self.executor, self._load_and_warm_up, name, number)
        if served is None:  # load_one logged why
            self.refused[path] = signature
            self.metrics.repository_event("refused")
            return
        self.refused.pop(path, None)
        self.registry.add(served)
        self.metrics.repository_event("loaded")
        self.metrics.models.set(len(self.registry.all()))
        log.info("serving %s/%d (latest: %d)", name, number, max(self.registry.models[name]))

    def _load_and_warm_up(self, name: str, number: int) -> ServedModel | None:
        served = load_one(self.settings, name, number, self.executor, self.observer)
        if served is not None:
            served.warm_up()
        return served

    def _retire_gone(self, name: str, wanted: set[int]) -> None:
        loaded = self.registry.models[name]
        labelled = set(self.registry.labels.get(name, {}).values())
        for number in sorted(set(loaded) - wanted):
            if len(loaded) == 1 or number in labelled:
                why = "it is the model's only loaded version" if len(loaded) == 1 else "a label points at it"
                message = "keeping %s/%d, gone from the repository: %s"
                self._once(f"keep {name}/{number}", why, message, name, number, why)
                continue
            self.registry.retire(name, number)
            self.metrics.repository_event("retired")
            self.metrics.models.set(len(self.registry.all()))
            log.info("retired %s/%d: new calls go to %s/%d", name, number, name, max(loaded))

    def _follow_labels(self, name: str) -> None:
        path = self.settings.repo / name / LABELS
        try:
            self.registry.set_labels(name, read_labels(path.parent))
        except RepositoryError as exc:
            if self._once(f"labels {name}", (_signature(path), str(exc)), "refusing %s: %s", path, exc):
                self.metrics.repository_event("refused")
            return
        self.reported.pop(f"labels {name}", None)

    def _once(self, key: str, state: object, message: str, *args: object) -> bool:
        """Log a refusal or a kept version once per state, not on every poll."""
        if self.reported.get(key) == state:
            return False
        self.reported[key] = state
        log.warning(message, *args)
        return True


def _signature(path: Path) -> tuple:
    """What changes when a version folder or a labels file is rewritten or renamed into place."""
    try:
        stat = path.stat()
        manifest = (path / MANIFEST).stat().st_mtime_ns if path.is_dir() else 0
    except OSError:
        return ()
    return (stat.st_ino, stat.st_mtime_ns, manifest)
