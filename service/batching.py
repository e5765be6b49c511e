"""Batching across requests: concurrent small calls share one onnxruntime run.

Requests queue per graph. A flush is scheduled when the first request arrives:
on the loop's next turn, so that calls received in the same turn join the batch,
or, while calls arrive closer together than ``max_delay`` (0.5 ms by default),
after that delay so that more join; a lone client never waits (and a lone small call,
with nothing queued or running, runs at once).
A full batch (``max_rows``) flushes at once. Two runs per graph may be in progress at
a time, one computing while the next is ready to start (so onnxruntime does not idle
while the loop answers the last batch and gathers the next); calls arriving while both
are taken form the next batch, so batches grow with load by themselves. Cancelled
calls (deadline expired, client gone) are dropped before they cost compute. Requests
marked ``alone`` (seeded ones) run in a batch of their own, so their results never
depend on their neighbours; a batch holds rows of one dtype (the encoder prepares raw
uint8 pixels itself). The queue is bounded: past ``max_queue_rows`` a call is
refused, not queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from vaeserve.service import tracing
from vaeserve.service.errors import OverloadedError

Run = Callable[[np.ndarray], tuple[np.ndarray, ...]]


@dataclass(frozen=True)
class Runner:
    """Runs a graph on a batch. Small batches run inline on the event loop, on a session
    with one thread: for them a hop to a worker thread and waking onnxruntime's thread
    pool cost more than the run itself. Larger batches leave the loop free to receive and
    answer calls: on CPU (``parts`` > 1) they are cut into that many pieces, run as
    one-thread calls in parallel on the executor's threads, one per core; with a GPU
    (``parts`` = 1) they run whole on the ``large`` session.

    Why pieces: one call spread over every core waits for its slowest thread, so each
    moment the event loop, gRPC or a client on the same machine takes a core stalls the
    whole call; independent one-thread calls just keep going on the other cores."""

    small: Run
    large: Run
    executor: Executor
    inline_rows: int
    parts: int = 1

    async def __call__(self, rows: np.ndarray) -> tuple[np.ndarray, ...]:
        if len(rows) <= self.inline_rows:
            return self.small(rows)
        loop = asyncio.get_running_loop()
        parts = min(self.parts, -(-len(rows) // MIN_PART_ROWS))
        if parts <= 1:
            run = self.large if self.parts == 1 else self.small
            return await loop.run_in_executor(self.executor, run, rows)
        step = -(-len(rows) // parts)
        pieces = [rows[start : start + step] for start in range(0, len(rows), step)]
        results = await asyncio.gather(*(loop.run_in_executor(self.executor, self.small, p) for p in pieces))
        return tuple(np.concatenate(outputs) for outputs in zip(*results))


# A piece smaller than this costs more in the hop to a thread than it saves in parallelism.
MIN_PART_ROWS = 32


# One run computing, one ready to start the moment it ends.
RUNS_IN_FLIGHT = 2


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
    # With traces on (wall-clock ns, as spans take them): queued, its batch's run, that batch's rows.
    queued_ns: int = field(default_factory=tracing.now)
    run_ns: tuple[int, int] = (0, 0)
    batch_rows: int = 0


class Batcher:
    def __init__(
        self,
        run: Runner,
        name: str,
        max_rows: int,
        max_delay_s: float,
        max_queue_rows: int,
        observer: Observer | None = None,
    ) -> None:
        self.run = run
        self.name = name
        self.max_rows = max_rows
        self.max_delay_s = max_delay_s
        self.max_queue_rows = max_queue_rows
        self.observer = observer or _Unobserved()
        self.queue: deque[_Item] = deque()
        self.queued_rows = 0
        self.timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self.running: set[asyncio.Task] = set()
        self.last_arrival = 0.0
        self.arrival_gap = float("inf")

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        if self.timer:
            self.timer.cancel()

    async def submit(self, rows: np.ndarray, alone: bool = False) -> tuple[np.ndarray, ...]:
        if self.queued_rows + len(rows) > self.max_queue_rows:
            raise OverloadedError(
                f"server busy: {self.queued_rows} rows already queued for the {self.name} "
                f"(limit {self.max_queue_rows}); retry with backoff"
            )
        now = time.perf_counter()
        self.arrival_gap, self.last_arrival = now - self.last_arrival, now
        if self._alone_and_small(rows):
            # A lone caller with a small batch: nothing could join it, so run it now, on the
            # loop, instead of a turn later through a task.
            self.observer.queued(self.name, 0.0)
            self.observer.batch(self.name, len(rows))
            started = tracing.now()
            outputs = self.run.small(rows)
            tracing.record("run", started, graph=self.name, batch_rows=len(rows))
            return outputs
        loop = asyncio.get_running_loop()
        item = _Item(rows, loop.create_future(), alone, now)
        self.queue.append(item)
        self.queued_rows += len(rows)
        if len(self.running) < RUNS_IN_FLIGHT:
            self._schedule(loop)
        try:
            return await item.future
        finally:
            if item.run_ns[0]:  # traced: its wait, and the run that served it with others' rows
                tracing.record("queue", item.queued_ns, item.run_ns[0], graph=self.name)
                tracing.record(
                    "run", item.run_ns[0], item.run_ns[1], graph=self.name, batch_rows=item.batch_rows
                )

    def _alone_and_small(self, rows: np.ndarray) -> bool:
        return (
            len(rows) <= self.run.inline_rows
            and not self.queue
            and not self.running
            and self.arrival_gap >= self.max_delay_s
        )

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.queued_rows >= self.max_rows:
            if self.timer:
                self.timer.cancel()
            self.timer = None
            self._flush()
        elif self.timer is None:
            # Wait for company only while calls arrive closer together than max_delay:
            # a lone client pays no delay.
            waiting = self.max_delay_s > 0 and self.arrival_gap < self.max_delay_s
            self.timer = (
                loop.call_later(self.max_delay_s, self._flush) if waiting else loop.call_soon(self._flush)
            )

    def _flush(self) -> None:
        self.timer = None
        if len(self.running) >= RUNS_IN_FLIGHT:
            return
        batch = self._take()
        if batch:
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self.running.add(task)
            task.add_done_callback(self.running.discard)

    def _take(self) -> list[_Item]:
        batch: list[_Item] = []
        rows = 0
        while self.queue:
            item = self.queue[0]
            if item.future.cancelled():  # deadline passed or client gone: costs nothing more
                self.queue.popleft()
                self.queued_rows -= len(item.rows)
                continue
            if batch and (
                item.alone
                or batch[0].alone
                or item.rows.dtype != batch[0].rows.dtype  # raw pixels and model inputs do not mix
                or rows + len(item.rows) > self.max_rows
            ):
                break
            self.queue.popleft()
            self.queued_rows -= len(item.rows)
            batch.append(item)
            rows += len(item.rows)
        return batch

    async def _run(self, batch: list[_Item]) -> None:
        try:
            await self._execute(batch)
        finally:
            self.running.discard(asyncio.current_task())
            if self.queue:  # calls that arrived during the run form the next batch now
                self._flush()

    async def _execute(self, batch: list[_Item]) -> None:
        started = time.perf_counter()
        for item in batch:
            self.observer.queued(self.name, started - item.queued_at)
        rows = batch[0].rows if len(batch) == 1 else np.concatenate([i.rows for i in batch])
        self.observer.batch(self.name, len(rows))
        run_started = tracing.now()
        try:
            outputs = await self.run(rows)
        except Exception as exc:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        if run_started:
            run_ns = (run_started, tracing.now())
            for item in batch:
                item.run_ns, item.batch_rows = run_ns, len(rows)
        start = 0
        for item in batch:
            stop = start + len(item.rows)
            if not item.future.done():
                item.future.set_result(tuple(o[start:stop] for o in outputs))
            start = stop


# The deadline of the call being handled (time.monotonic()), set by the gRPC front ends: each
# asyncio task has its own copy, so the data plane reads its call's without a parameter.
deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("deadline", default=None)


# The fewest rows (with those in flight) whose time says anything of the rows/s (Admission).
MIN_MEASURED_ROWS = 32


class Admission:
    """Bounds the rows a graph (or the scorer) has admitted and not finished: past
    ``max_queue_rows`` a call is refused at once instead of waiting behind all of them, and a call
    whose deadline the work ahead of it would pass is refused up front, from the rows/s measured
    on the recent runs."""

    def __init__(self, name: str, max_queue_rows: int, unit: str = "rows") -> None:
        self.name, self.max_queue_rows, self.unit = name, max_queue_rows, unit
        self.in_flight_rows = 0
        self.rows_per_s = 0.0  # measured while busy; 0: not yet known

    @contextlib.contextmanager
    def holding(self, count: int) -> Iterator[None]:
        """Admit ``count`` rows (OverloadedError if not) and hold them until the block ends; a
        block that completes is timed (one cut short says nothing of the rate)."""
        self._admit(count)
        self.in_flight_rows += count
        started = time.perf_counter()
        completed = False
        try:
            yield
            completed = True
        finally:
            self.in_flight_rows -= count
            if completed:
                self._measure(count, time.perf_counter() - started)

    def _admit(self, count: int) -> None:
        ahead = self.in_flight_rows
        if ahead + count > self.max_queue_rows:
            raise OverloadedError(
                f"server busy: {ahead} {self.unit} in progress for the {self.name} (limit "
                f"{self.max_queue_rows}, from --max-queue-rows); retry with backoff"
            )
        until = deadline.get()
        if until is not None and self.rows_per_s:
            needed = (ahead + count) / self.rows_per_s
            left = until - time.monotonic()
            if needed > left:
                raise OverloadedError(
                    f"server busy: {ahead} {self.unit} ahead of this call for the {self.name} need about "
                    f"{needed:.2f} s, more than the {max(left, 0):.2f} s left before its deadline; "
                    "retry with backoff or a longer deadline"
                )

    def _measure(self, count: int, seconds: float) -> None:
        """Rows/s: a call's rows over its time, all calls in flight together. A call of fewer
        than MIN_MEASURED_ROWS rows is mostly fixed cost: timed alone it would make the rate look
        tiny, and the next large call be refused for a deadline it would meet."""
        if self.in_flight_rows + count < MIN_MEASURED_ROWS:
            return
        rate = (self.in_flight_rows + count) / seconds if seconds > 0 else 0.0
        self.rows_per_s = rate if not self.rows_per_s else 0.8 * self.rows_per_s + 0.2 * rate


class Direct:
    """The same interface without merging: each call runs on its own (batching off, the default);
    runs above ``inline_rows`` wait for the executor's threads, so they pass ``Admission``."""

    def __init__(self, run: Runner, name: str, max_queue_rows: int, observer: Observer | None = None) -> None:
        self.run, self.name = run, name
        self.observer = observer or _Unobserved()
        self.admission = Admission(name, max_queue_rows)

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def submit(self, rows: np.ndarray, alone: bool = False) -> tuple[np.ndarray, ...]:
        # Nothing queues here, so no queue time is observed: a metric update is a measurable
        # share of a batch-1 call (docs/benchmarks.md).
        self.observer.batch(self.name, len(rows))
        started = tracing.now()
        if len(rows) <= self.run.inline_rows:
            outputs = self.run.small(rows)  # what Runner would do, one coroutine fewer per call
        else:
            with self.admission.holding(len(rows)):
                tracing.record(
                    "admission", started, graph=self.name, in_flight_rows=self.admission.in_flight_rows
                )
                started = tracing.now()
                outputs = await self.run(rows)
        tracing.record("run", started, graph=self.name, batch_rows=len(rows))
        return outputs
