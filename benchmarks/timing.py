"""Throughput measurement shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def rows_per_second(call: Callable[[], object], rows: int, seconds: float = 0.3, repeats: int = 5) -> float:
    """Median over ``repeats`` windows of at least ``seconds`` each, after one warm-up call."""
    call()
    rates = []
    for _ in range(repeats):
        calls, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            call()
            calls += 1
        rates.append(calls * rows / elapsed)
    return statistics.median(rates)
