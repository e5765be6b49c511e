"""Batching across requests, on a really exported pair: merging, order, cancellation, bounds."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from vaeserve.repository import resolve
from vaeserve.runtime import OnnxPair
from vaeserve.service.batching import Batcher, Runner
from vaeserve.service.errors import OverloadedError


class Recorder:
    def __init__(self) -> None:
        self.batches: list[int] = []

    def queued(self, graph: str, seconds: float) -> None:
        pass

    def batch(self, graph: str, rows: int) -> None:
        self.batches.append(rows)


@pytest.fixture(scope="module")
def pair(repo: Path) -> OnnxPair:
    return OnnxPair.load(resolve(repo, "tiny"))


def batcher(
    pair: OnnxPair, recorder: Recorder, delay: float = 0.005, max_rows: int = 64, max_queue_rows: int = 1000
) -> Batcher:
    runner = Runner(pair.encode, pair.encode, ThreadPoolExecutor(1), inline_rows=4)
    return Batcher(runner, "encoder", max_rows, delay, max_queue_rows, recorder)


def rows(n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, 784)) > 0.5).astype(np.float32)


def test_concurrent_requests_share_runs_and_get_their_own_rows(pair: OnnxPair) -> None:
    recorder = Recorder()

    async def main() -> list:
        b = batcher(pair, recorder)
        inputs = [rows(n, i) for i, n in enumerate([3, 1, 7, 2, 5, 30, 40])]
        outputs = await asyncio.gather(*(b.submit(x) for x in inputs))
        return list(zip(inputs, outputs))

    for x, (mean, stddev) in asyncio.run(main()):
        expected_mean, expected_stddev = pair.encode(x)
        np.testing.assert_array_equal(mean, expected_mean)
        np.testing.assert_array_equal(stddev, expected_stddev)
    assert sum(recorder.batches) == 88 and len(recorder.batches) < 7  # merged
    assert max(recorder.batches) <= 64


def test_seeded_requests_run_alone(pair: OnnxPair) -> None:
    recorder = Recorder()

    async def main() -> None:
        b = batcher(pair, recorder)
        await asyncio.gather(b.submit(rows(3, 0)), b.submit(rows(5, 1), alone=True), b.submit(rows(2, 2)))

    asyncio.run(main())
    assert 5 in recorder.batches and sum(recorder.batches) == 10


def test_cancelled_calls_cost_no_compute(pair: OnnxPair) -> None:
    recorder = Recorder()
    gate = threading.Event()

    def gated_encode(x: np.ndarray) -> tuple[np.ndarray, ...]:
        gate.wait(10)  # hold the first batch in onnxruntime while more calls queue
        return pair.encode(x)

    async def main() -> None:
        runner = Runner(pair.encode, gated_encode, ThreadPoolExecutor(1), inline_rows=4)
        b = Batcher(runner, "encoder", 4096, 0.005, 100_000, recorder)
        busy = []
        for held in (1, 2):  # both runs in flight are taken: later calls must queue
            busy.append(asyncio.ensure_future(b.submit(rows(2000, held))))
            while len(recorder.batches) < held:
                await asyncio.sleep(0.001)
        doomed = asyncio.ensure_future(b.submit(rows(9, 1)))
        kept = asyncio.ensure_future(b.submit(rows(2, 2)))
        await asyncio.sleep(0.01)
        doomed.cancel()  # as gRPC does when a deadline passes or the client goes away
        gate.set()
        await asyncio.gather(*busy, kept)

    asyncio.run(main())
    assert recorder.batches == [2000, 2000, 2]


def test_full_queue_refuses_new_calls(pair: OnnxPair) -> None:
    async def main() -> None:
        b = batcher(pair, Recorder(), delay=0.05, max_queue_rows=10)
        first = asyncio.ensure_future(b.submit(rows(8, 0)))
        await asyncio.sleep(0)
        with pytest.raises(OverloadedError, match=r"8 rows already queued for the encoder \(limit 10\)"):
            await b.submit(rows(3, 1))
        await first

    asyncio.run(main())


def test_raw_pixels_and_model_inputs_never_share_a_run(pair: OnnxPair) -> None:
    """uint8 pixels are prepared by the run itself, so a batch must hold one dtype."""
    seen: list[tuple[np.dtype, int]] = []

    def prepared_encode(x: np.ndarray) -> tuple[np.ndarray, ...]:
        seen.append((x.dtype, len(x)))
        return pair.encode((x > 127).astype(np.float32) if x.dtype == np.uint8 else x)

    async def main() -> list:
        runner = Runner(prepared_encode, prepared_encode, ThreadPoolExecutor(1), inline_rows=4)
        b = Batcher(runner, "encoder", 64, 0.005, 1000, Recorder())
        pixels = np.random.default_rng(0).integers(0, 256, (6, 784)).astype(np.uint8)
        floats = rows(5, 1)
        return await asyncio.gather(b.submit(pixels), b.submit(floats), b.submit(pixels[:2])), pixels, floats

    (from_pixels, from_floats, _), pixels, floats = asyncio.run(main())
    # Queued in the order pixels, floats, pixels: the floats split what would merge.
    assert sorted(n for dtype, n in seen if dtype == np.uint8) == [2, 6]
    assert [n for dtype, n in seen if dtype == np.float32] == [5]
    np.testing.assert_array_equal(from_pixels[0], pair.encode((pixels > 127).astype(np.float32))[0])
    np.testing.assert_array_equal(from_floats[0], pair.encode(floats)[0])


def test_a_lone_small_call_runs_at_once(pair: OnnxPair) -> None:
    """Nothing queued or running and no company coming: no turn of the loop is spent waiting."""
    recorder = Recorder()

    async def main() -> tuple[np.ndarray, ...]:
        b = batcher(pair, recorder)
        call = b.submit(rows(2, 0))
        try:
            call.send(None)
        except StopIteration as finished:
            return finished.value
        call.close()
        raise AssertionError("the lone call waited for a later turn of the loop")

    mean, _ = asyncio.run(main())
    np.testing.assert_array_equal(mean, pair.encode(rows(2, 0))[0])
    assert recorder.batches == [2]


def test_direct_admission_bounds_rows_in_flight_and_honours_deadlines(pair: OnnxPair) -> None:
    from vaeserve.service.batching import Direct, deadline

    gate = threading.Event()

    def slow(rows: np.ndarray):
        gate.wait(10)
        return pair.encode(rows)

    runner = Runner(slow, slow, ThreadPoolExecutor(2), inline_rows=4, parts=1)
    direct = Direct(runner, "encoder", max_queue_rows=100)
    rows = np.zeros((60, 784), np.float32)

    async def main() -> None:
        first = asyncio.ensure_future(direct.submit(rows))
        await asyncio.sleep(0.05)
        with pytest.raises(OverloadedError, match=r"60 rows in progress .*\(limit 100"):
            await direct.submit(rows)  # 60 + 60 > 100: refused at once, not queued
        assert (await direct.submit(rows[:2]))[0].shape == (2, 8)  # small calls run inline
        gate.set()
        await first
        assert direct.admission.in_flight_rows == 0 and direct.admission.rows_per_s > 0
        gate.clear()
        blocked = asyncio.ensure_future(direct.submit(rows[:40]))
        await asyncio.sleep(0.05)
        direct.admission.rows_per_s = 100.0  # (40 ahead + 40) rows at 100 rows/s: 0.8 s of work
        deadline.set(time.monotonic() + 0.2)
        with pytest.raises(OverloadedError, match=r"more than the .* s left before its deadline"):
            await direct.submit(rows[:40])
        deadline.set(time.monotonic() + 5)
        admitted = asyncio.ensure_future(direct.submit(rows[:40]))
        gate.set()
        await asyncio.gather(blocked, admitted)

    asyncio.run(main())


def test_a_tiny_call_does_not_set_the_rate_that_deadlines_are_judged_by() -> None:
    """Three rows that took a second say nothing of rows/s (their time is fixed cost): a large call
    after them is not refused for a deadline it would meet. Sixty rows do set it."""
    from vaeserve.service.batching import MIN_MEASURED_ROWS, Admission, deadline

    admission = Admission("scorer", max_queue_rows=10_000)
    admission._measure(3, 1.0)
    assert admission.rows_per_s == 0.0 and MIN_MEASURED_ROWS > 3
    token = deadline.set(time.monotonic() + 1.0)
    try:
        with admission.holding(2000):  # admitted: no rate is known yet
            pass
    finally:
        deadline.reset(token)
    admission._measure(60, 1.0)
    assert admission.rows_per_s > 0
