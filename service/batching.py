"""Batching across requests: concurrent small calls share one onnxruntime run.

Requests queue per graph. A worker task takes everything queued (up to
``max_rows``) as soon as the previous run finishes, so under load batches grow
by themselves while a lone request waits at most ``max_delay`` (0 by default:
it runs at once). Cancelled calls (deadline expired, client gone) are dropped
before they cost compute. Requests marked ``alone`` (seeded ones) run in a
batch of their own, so their results never depend on their neighbours.
The queue is bounded: past ``max_queue_rows`` a call is refused, not queued.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from vaeserve.errors import VaeError

Run = Callable[[np.ndarray], tuple[np.ndarray, ...]]


class OverloadedError(VaeError):
    """The queue is full; the client should back off and retry."""


class Observer(Protocol):
    def queued(self, graph: str, seconds: float) -> None: ...

    def batch(self, graph: str, rows: int) -> None: ...


class _Unobserved:
    def queued(self, graph: str, seconds: float) -> None:
        pass

    def batch(self, graph: str, rows: int) -> None:
        pass


@dataclass
class _Item:
    rows: np.ndarray
    future: asyncio.Future
    alone: bool
    queued_at: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(
        self,
        run: Run,
        executor: Executor,
        name: str,
        max_rows: int,
        max_delay_s: float,
        max_queue_rows: int,
        observer: Observer | None = None,
    ) -> None:
        self.run = run
        self.executor = executor
        self.name = name
        self.max_rows = max_rows
        self.max_delay_s = max_delay_s
        self.max_queue_rows = max_queue_rows
        self.observer = observer or _Unobserved()
        self.queue: deque[_Item] = deque()
        self.queued_rows = 0
        self.wakeup = asyncio.Event()
        self.worker: asyncio.Task | None = None

    def start(self) -> None:
        self.worker = asyncio.get_running_loop().create_task(self._work(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        if self.worker:
            self.worker.cancel()

    async def submit(self, rows: np.ndarray, alone: bool = False) -> tuple[np.ndarray, ...]:
        if self.queued_rows + len(rows) > self.max_queue_rows:
            raise OverloadedError(
                f"server busy: {self.queued_rows} rows already queued for the "
                f"{self.name} (limit {self.max_queue_rows}); retry with backoff"
            )
        item = _Item(rows, asyncio.get_running_loop().create_future(), alone)
        self.queue.append(item)
        self.queued_rows += len(rows)
        self.wakeup.set()
        return await item.future

    async def _work(self) -> None:
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            while self.queue:
                if self.max_delay_s > 0 and self.queued_rows < self.max_rows:
                    await self._gather()
                batch = self._take()
                if batch:
                    await self._run(batch)

    async def _gather(self) -> None:
        """Give a lone request up to max_delay for others to join it."""
        deadline = self.queue[0].queued_at + self.max_delay_s
        while self.queued_rows < self.max_rows and (left := deadline - time.perf_counter()) > 0:
            self.wakeup.clear()
            try:
                await asyncio.wait_for(self.wakeup.wait(), left)
            except TimeoutError:
                break

    def _take(self) -> list[_Item]:
        batch: list[_Item] = []
        rows = 0
        while self.queue:
            item = self.queue[0]
            if item.future.cancelled():  # deadline passed or client gone: costs nothing more
                self.queue.popleft()
                self.queued_rows -= len(item.rows)
                continue
            if batch and (item.alone or batch[0].alone or rows + len(item.rows) > self.max_rows):
                break
            self.queue.popleft()
            self.queued_rows -= len(item.rows)
            batch.append(item)
            rows += len(item.rows)
        return batch

    async def _run(self, batch: list[_Item]) -> None:
        started = time.perf_counter()
        for item in batch:
            self.observer.queued(self.name, started - item.queued_at)
        rows = batch[0].rows if len(batch) == 1 else np.concatenate([i.rows for i in batch])
        self.observer.batch(self.name, len(rows))
        loop = asyncio.get_running_loop()
        try:
            outputs = await loop.run_in_executor(self.executor, self.run, rows)
        except Exception as exc:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        start = 0
        for item in batch:
            stop = start + len(item.rows)
            if not item.future.done():
                item.future.set_result(tuple(o[start:stop] for o in outputs))
            start = stop


class Direct:
    """The same interface without merging: each call runs on its own (``--no-batching``)."""

    def __init__(self, run: Run, executor: Executor, name: str, observer: Observer | None = None) -> None:
        self.run, self.executor, self.name = run, executor, name
        self.observer = observer or _Unobserved()

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def submit(self, rows: np.ndarray, alone: bool = False) -> tuple[np.ndarray, ...]:
        self.observer.queued(self.name, 0.0)
        self.observer.batch(self.name, len(rows))
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.run, rows)
