"""Bounded residency (``--max-loaded-models N``, ``--max-loaded-mb M``): at most N models (and M
MiB of their graphs) are loaded at once. A call naming a servable model that is not loaded raises
``NotResidentError`` from the registry; the call's wrapper (gRPC's and HTTP's, one place each) waits
for ``Residency.load`` and runs the call again, so a call never fails because of the bound, only
waits, within its deadline. Loading evicts the least recently called models first, one load at a
time. A model is loaded with every version the server would serve of it, and evicted whole.
"""

from __future__ import annotations

import asyncio
import logging
import time

from vaeserve.errors import ModelNotFoundError
from vaeserve.service.batching import deadline
from vaeserve.service.errors import OverloadedError

log = logging.getLogger("vaeserve.service")


class NotResidentError(ModelNotFoundError):
    """A servable model that is not loaded now: ``loaded()`` loads it (evicting another)."""

    def __init__(self, name: str, residency: Residency) -> None:
        super().__init__(f"model {name!r} is not loaded now (bounded residency); it is loaded on demand")
        self.name = name
        self.residency = residency

    async def loaded(self) -> None:
        """Wait until the model is loaded, at most until the call's deadline."""
        until = deadline.get()
        left = None if until is None else until - time.monotonic()
        try:
            await asyncio.wait_for(asyncio.shield(self.residency.load(self.name)), left)
        except TimeoutError:
            raise OverloadedError(
                f"model {self.name!r} is being loaded (bounded residency) and was not ready before the "
                "call's deadline; retry, or call with a longer deadline"
            ) from None


class Residency:
    def __init__(self, manager, max_models: int, max_bytes: int) -> None:
        self.manager = manager
        self.max_models = max_models
        self.max_bytes = max_bytes
        self.lock = asyncio.Lock()  # one load (and its evictions) at a time
        self.loading: dict[str, asyncio.Task] = {}

    @property
    def bounded(self) -> bool:
        return bool(self.max_models or self.max_bytes)

    def fits(self, resident: dict[str, int], size: int) -> bool:
        """Whether a model of ``size`` bytes may join ``resident`` (name → bytes) without eviction."""
        if self.max_models and len(resident) + 1 > self.max_models:
            return False
        return not (self.max_bytes and resident and sum(resident.values()) + size > self.max_bytes)

    def load(self, name: str) -> asyncio.Task:
        """The load of ``name`` (one task however many calls wait for it)."""
        task = self.loading.get(name)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(name))
            self.loading[name] = task
            task.add_done_callback(lambda _: self.loading.pop(name, None))
        return task

    async def _load(self, name: str) -> None:
        async with self.lock:
            registry = self.manager.registry
            if name in registry.models:
                return
            size = self.manager.model_bytes(name)
            while registry.models and not self.fits(self.manager.resident_bytes(), size):
                victim = min(registry.models, key=lambda n: registry.last_used.get(n, 0.0))
                self.manager.evict(victim, f"least recently called, to load {name}")
            started = time.perf_counter()
            await self.manager.load_resident(name)
            log.info("loaded %s on demand in %.2f s (bounded residency)", name, time.perf_counter() - started)
