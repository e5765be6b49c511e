"""Mirrored calls to a traffic split's shadow version (`vae traffic ... --shadow KEY`).

When a call that named no version is routed by a split that has a shadow, the registry puts the
shadow in ``SHADOW`` for the call's task; the data plane's use (service.uses), once it has the
routed version's answer, hands a copy of the call to ``Mirror``, which runs it on the shadow in a
task of its own. The caller is answered without waiting for it: a shadow's errors and slowness
never reach a caller. At most ``limit`` mirrored calls run at once; past that a copy is dropped
(and counted), so a slow shadow cannot pile up work. Counted: each mirrored call's outcome, and
how far its outputs are from the routed version's (the largest absolute difference over the
outputs both gave with one shape).
"""

from __future__ import annotations

import asyncio
import logging
from contextvars import ContextVar

import numpy as np

log = logging.getLogger("vaeserve.service")

# The shadow of the call being handled (a served version), or None: set by ModelRegistry.resolve.
SHADOW: ContextVar[object | None] = ContextVar("shadow", default=None)
MAX_MIRRORED_IN_FLIGHT = 16


class Mirror:
    def __init__(self, metrics, limit: int = MAX_MIRRORED_IN_FLIGHT) -> None:
        self.metrics = metrics
        self.limit = limit
        self.tasks: set[asyncio.Task] = set()

    def send(self, shadow, use: str, args: tuple, kwargs: dict, answer: dict[str, np.ndarray]) -> None:
        """Run ``use`` on ``shadow`` with a copy of the call's arguments, off the caller's path."""
        version = shadow.version
        if len(self.tasks) >= self.limit:
            self.metrics.shadow_call(version.name, version.version, use, "dropped")
            return
        # The caller's arrays may be reused once it is answered (shared memory): the copy's own.
        args = tuple(np.array(a, copy=True) if isinstance(a, np.ndarray) else a for a in args)
        task = asyncio.get_running_loop().create_task(self._run(shadow, use, args, kwargs, answer))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, shadow, use: str, args: tuple, kwargs: dict, answer: dict[str, np.ndarray]) -> None:
        SHADOW.set(None)  # the mirrored call is no caller's: it mirrors nothing itself
        version = shadow.version
        try:
            mirrored = await getattr(shadow, use)(*args, **kwargs)
        except Exception as exc:  # the shadow's failure is counted and logged, never answered
            log.debug("shadow %s/%d %s failed: %s", version.name, version.version, use, exc)
            self.metrics.shadow_call(version.name, version.version, use, "failed")
            return
        self.metrics.shadow_call(version.name, version.version, use, "answered", farthest(answer, mirrored))


def farthest(routed: dict[str, np.ndarray], mirrored: dict[str, np.ndarray]) -> float | None:
    """The largest absolute difference over the outputs both gave with one shape (None if none)."""
    differences = [
        float(np.max(np.abs(routed[name].astype(np.float64) - mirrored[name].astype(np.float64))))
        for name in routed.keys() & mirrored.keys()
        if routed[name].shape == mirrored[name].shape and routed[name].size
    ]
    return max(differences) if differences else None
