"""`vae serve --workers N`: N server processes on one port, supervised by this one.

A Python server runs its gRPC event loop on one thread, and on small batches that thread
is the bottleneck (docs/benchmarks.md). Each worker is a whole `vae serve` in its
own process; all bind the same port with SO_REUSEPORT, and the kernel spreads incoming
connections (not calls) over them. This process only supervises:

- it serves the Prometheus metrics of all workers together (prometheus_client's
  multiprocess mode, through a folder of per-process files it creates and removes);
- on SIGTERM or SIGINT it passes SIGTERM on, each worker drains as a lone server does,
  and it exits 0 once they all have;
- a worker that exits on its own (a failed start, a crash) stops the others and the
  supervisor exits 1, so that Docker or the orchestrator restarts the whole service.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event

from vaeserve.runtime import usable_cores
from vaeserve.service.live import CONTROL_ENV
from vaeserve.service.settings import ServeSettings

log = logging.getLogger("vaeserve.service")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Beyond the grace period, time for a worker to close its sessions and exit.
EXIT_MARGIN_S = 30.0


def worker_settings(settings: ServeSettings) -> ServeSettings:
    """One worker's settings: metrics served by the supervisor. Each worker may cut a large call
    into one piece per core (``--threads 0``): a lone large call then uses every core, and under
    load the workers' pieces share them (measured against one thread per worker: batch-1,024
    calls at concurrency 1 went from 0.85 to 1.06 of Triton, other cells within noise)."""
    threads = settings.threads or usable_cores()
    return dataclasses.replace(settings, workers=1, threads=threads, metrics_port=0)


def run_workers(settings: ServeSettings) -> int:
    each = worker_settings(settings)
    metrics_dir = tempfile.mkdtemp(prefix="vaeserve-metrics-")
    os.environ[MULTIPROC_ENV] = metrics_dir  # read by each worker's prometheus_client at import
    control_dir = tempfile.mkdtemp(prefix="vaeserve-control-")
    os.environ[CONTROL_ENV] = control_dir  # hand-made model loads and unloads, shared by the workers
    stop = _stop_on_signals()
    level = logging.getLogger().getEffectiveLevel()
    context = multiprocessing.get_context("spawn")
    serving = [context.Event() for _ in range(settings.workers)]
    workers = [
        context.Process(
            target=_worker, args=(i + 1, settings.workers, each, level, event), name=f"vae-serve-{i + 1}"
        )
        for i, event in enumerate(serving)
    ]
    metrics_server = None
    try:
        metrics_server = _serve_metrics(settings, metrics_dir) if settings.metrics_port else None
        for worker in workers:
            worker.start()
        log.info(
            "supervising %d workers on port %d (%d onnxruntime threads each), pids %s; "
            "metrics of them all on :%s",
            settings.workers,
            settings.port,
            each.threads,
            ", ".join(str(w.pid) for w in workers),
            settings.metrics_port or "off",
        )
        return _supervise(workers, serving, stop, settings.grace_s)
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        shutil.rmtree(control_dir, ignore_errors=True)


def _stop_on_signals() -> list[int]:
    """Signals received, appended by the handlers (the main loop polls the list)."""
    received: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, _frame: received.append(number))
    return received


def _supervise(workers: list[BaseProcess], serving: list[Event], stop: list[int], grace_s: float) -> int:
    announced = False
    while not stop:
        if not announced and all(event.is_set() for event in serving):
            log.info("all %d workers serving", len(workers))
            announced = True
        ended = wait([w.sentinel for w in workers], timeout=0.2)
        for worker in workers:
            if worker.sentinel in ended:
                worker.join()  # its sentinel may signal just before it can be reaped
                log.error("worker %s exited with %s; stopping the others", worker.name, worker.exitcode)
        if ended:
            _stop(workers, grace_s)
            return 1
    log.info("signal %d: stopping %d workers (grace %.1f s)", stop[0], len(workers), grace_s)
    return _stop(workers, grace_s)


def _stop(workers: list[BaseProcess], grace_s: float) -> int:
    """SIGTERM every live worker, wait for them to drain, kill any that outstay; 0 when all exited 0."""
    for worker in workers:
        if worker.exitcode is None:
            os.kill(worker.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s + EXIT_MARGIN_S
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
        if worker.exitcode is None:
            log.error("worker %s (pid %d) did not exit in time; killing it", worker.name, worker.pid)
            worker.kill()
            worker.join()
    return 0 if all(w.exitcode == 0 for w in workers) else 1


def _serve_metrics(settings: ServeSettings, metrics_dir: str):
    from prometheus_client import CollectorRegistry, multiprocess

    from vaeserve.service.metrics import serve_http

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=metrics_dir)
    return serve_http(settings.host, settings.metrics_port, registry)


def _worker(index: int, count: int, settings: ServeSettings, level: int, serving: Event) -> None:
    """One worker process: a whole server, its log lines marked with its number."""
    from vaeserve.errors import VaeError
    from vaeserve.service.cli import run_on_event_loop
    from vaeserve.service.server import serve

    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s %(name)s [worker {index}/{count}]: %(message)s",
    )
    # The supervisor's handlers do not survive spawn; until the server installs its own,
    # a Ctrl-C must not print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        code = run_on_event_loop(serve(settings, serving.set), settings.event_loop)
    except VaeError as exc:
        logging.getLogger("vaeserve.service").error("%s", exc)
        code = 1
    raise SystemExit(code)
