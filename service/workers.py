"""`vae serve --workers N`: N server processes on one port, supervised by this one.

A Python server runs its gRPC event loop on one thread, and on small batches that thread
is the bottleneck (docs/benchmarks.md). Each worker is a whole `vae serve` in its
own process; all bind the same port with SO_REUSEPORT, and the kernel spreads incoming
connections (not calls) over them. This process only supervises:

- it serves the Prometheus metrics of all workers together (prometheus_client's
  multiprocess mode, through a folder of per-process files it creates and removes);
- on SIGTERM or SIGINT it passes SIGTERM on, each worker drains as a lone server does,
  and it exits 0 once they all have;
- a worker that dies (a crash, SIGKILL, out of memory) is logged, counted
  (``vaeserve_worker_restarts_total``) and restarted with backoff while the others keep serving;
  one that keeps dying, or that fails its first start, stops the others and the supervisor exits
  1, so that Docker or the orchestrator restarts the whole service;
- its temporary folders carry its pid, and a fresh start removes those of supervisors that are
  gone (a SIGKILLed supervisor cannot clean up).
"""

from __future__ import annotations

import ctypes
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
from pathlib import Path

from vaeserve.runtime import usable_cores
from vaeserve.service.manager import SHARED_UNLOADS_ENV, ServedSet, find_servable
from vaeserve.service.settings import ServeSettings

log = logging.getLogger("vaeserve.service")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Set for the workers: they share the supervisor's port on purpose (server.refuse_a_stray_server).
WORKER_ENV = "VAESERVE_SUPERVISOR_PID"
METRICS_PREFIX, SHARED_PREFIX = "vaeserve-metrics-", "vaeserve-control-"
# A dead worker is restarted after 0.5 s, then 1, 2, 4 s...; five deaths within a minute, or one
# before it ever served (a bad model, a bad setting), and the supervisor gives up.
RESTART_BACKOFF_S, MAX_BACKOFF_S = 0.5, 8.0
GIVE_UP_EXITS, GIVE_UP_WINDOW_S = 5, 60.0
PR_SET_PDEATHSIG = 1  # prctl(2)
# Beyond the grace period, time for a worker to close its sessions and exit.
EXIT_MARGIN_S = 30.0


def worker_settings(settings: ServeSettings) -> ServeSettings:
    """One worker's settings: metrics served by the supervisor. Each worker may cut a large call
    into one piece per core (``--threads 0``): a lone large call then uses every core, and under
    load the workers' pieces share them (with one thread per worker, a lone large call ran on a
    single core)."""
    threads = settings.threads or usable_cores()
    return dataclasses.replace(settings, workers=1, threads=threads, metrics_port=0)


def run_workers(settings: ServeSettings) -> int:
    # A repository with nothing to serve, and each version refused, is said once, here: the
    # workers serve what this finds (ServedSet) and do not look again.
    found = find_servable(settings, log_refusals=True)
    each = worker_settings(settings)
    sweep_leftovers()
    metrics_dir = tempfile.mkdtemp(prefix=f"{METRICS_PREFIX}{os.getpid()}-")
    os.environ[MULTIPROC_ENV] = metrics_dir  # read by each worker's prometheus_client at import
    shared_dir = tempfile.mkdtemp(prefix=f"{SHARED_PREFIX}{os.getpid()}-")
    os.environ[SHARED_UNLOADS_ENV] = shared_dir  # operators' model loads and unloads, for every worker
    ServedSet.of(found).write(Path(shared_dir))  # what every worker serves, decided once
    os.environ[WORKER_ENV] = str(os.getpid())  # the workers may share the port: they are ours
    stop = _stop_on_signals()
    pool = Pool(each, settings.workers, logging.getLogger().getEffectiveLevel(), metrics_dir)
    metrics_server = None
    try:
        metrics_server = _serve_metrics(settings, metrics_dir, pool) if settings.metrics_port else None
        for slot in range(settings.workers):
            pool.start(slot)
        log.info(
            "supervising %d workers on port %d (%d onnxruntime threads each), pids %s; "
            "metrics of them all on :%s",
            settings.workers,
            settings.port,
            each.threads,
            ", ".join(str(w.pid) for w in pool.workers),
            settings.metrics_port or "off",
        )
        return _supervise(pool, stop, settings.grace_s)
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        shutil.rmtree(shared_dir, ignore_errors=True)


def sweep_leftovers(root: Path | None = None) -> None:
    """Remove the folders of supervisors that are gone (a SIGKILLed one cannot clean up)."""
    root = root or Path(tempfile.gettempdir())
    for folder in [*root.glob(f"{METRICS_PREFIX}*"), *root.glob(f"{SHARED_PREFIX}*")]:
        owner = folder.name.removeprefix(METRICS_PREFIX).removeprefix(SHARED_PREFIX).split("-")[0]
        if owner.isdecimal() and not _alive(int(owner)):
            shutil.rmtree(folder, ignore_errors=True)
            log.info("removed %s, left by a supervisor that is gone", folder)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Pool:
    """The worker processes, one per slot, restarted when one dies."""

    def __init__(self, settings: ServeSettings, count: int, level: int, metrics_dir: str) -> None:
        self.settings, self.count, self.level, self.metrics_dir = settings, count, level, metrics_dir
        self.context = multiprocessing.get_context("spawn")
        self.workers: list[BaseProcess] = [None] * count  # type: ignore[list-item]
        self.serving: list[Event] = [self.context.Event() for _ in range(count)]
        self.exits: list[list[float]] = [[] for _ in range(count)]  # when each slot's worker died
        self.served = [False] * count  # whether the slot has ever served
        self.restarts = 0

    def start(self, slot: int) -> None:
        self.serving[slot] = self.context.Event()
        worker = self.context.Process(
            target=_worker,
            args=(slot + 1, self.count, self.settings, self.level, self.serving[slot]),
            name=f"vae-serve-{slot + 1}",
        )
        worker.start()
        self.workers[slot] = worker

    def reap(self, slot: int) -> None:
        """A dead worker: its live gauges leave the metrics (its counts stay), its exit is noted."""
        from prometheus_client import multiprocess

        worker = self.workers[slot]
        worker.join()  # its sentinel may signal just before it can be reaped
        multiprocess.mark_process_dead(worker.pid, self.metrics_dir)
        self.exits[slot].append(time.monotonic())
        self.serving[slot].clear()  # "all N workers serving" waits for its successor

    def backoff(self, slot: int) -> float | None:
        """Seconds before restarting the slot, or None when it keeps dying (or failed its first
        start: a bad model or setting, which restarting would not mend)."""
        recent = [t for t in self.exits[slot] if t > time.monotonic() - GIVE_UP_WINDOW_S]
        if not self.served[slot] or len(recent) >= GIVE_UP_EXITS:
            return None
        return min(RESTART_BACKOFF_S * 2 ** (len(recent) - 1), MAX_BACKOFF_S)


def _stop_on_signals() -> list[int]:
    """Signals received, appended by the handlers (the main loop polls the list)."""
    received: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, _frame: received.append(number))
    return received


def _supervise(pool: Pool, stop: list[int], grace_s: float) -> int:
    """Until a signal: restart a worker that dies, with backoff, while the others serve; give up
    (exit 1, so that the orchestrator restarts the service) when one keeps dying or fails its
    first start."""
    announced = False
    restart_at: dict[int, float] = {}
    while not stop:
        for slot, event in enumerate(pool.serving):
            pool.served[slot] = pool.served[slot] or event.is_set()
        if not announced and all(event.is_set() for event in pool.serving):
            log.info("all %d workers serving", pool.count)
            announced = True
        live = [w.sentinel for i, w in enumerate(pool.workers) if i not in restart_at]
        ended = wait(live, timeout=0.2)
        for slot, worker in enumerate(pool.workers):
            if slot in restart_at or worker.sentinel not in ended:
                continue
            pool.reap(slot)
            delay = pool.backoff(slot)
            if delay is None:
                why = (
                    f"({GIVE_UP_EXITS} times in {GIVE_UP_WINDOW_S:.0f} s)"
                    if pool.served[slot]
                    else "before it ever served"
                )
                log.error(
                    "worker %s exited with %s %s; stopping the others", worker.name, worker.exitcode, why
                )
                _stop(pool.workers, grace_s)
                return 1
            log.error(
                "worker %s (pid %d) exited with %s; restarting it in %.1f s, the others serve meanwhile",
                worker.name,
                worker.pid,
                worker.exitcode,
                delay,
            )
            restart_at[slot] = time.monotonic() + delay
            announced = False
        for slot, when in list(restart_at.items()):
            if time.monotonic() >= when:
                del restart_at[slot]
                pool.start(slot)
                pool.restarts += 1
                log.info("worker %s restarted, pid %d", pool.workers[slot].name, pool.workers[slot].pid)
    log.info("signal %d: stopping %d workers (grace %.1f s)", stop[0], pool.count, grace_s)
    return _stop([w for i, w in enumerate(pool.workers) if i not in restart_at], grace_s)


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


def _serve_metrics(settings: ServeSettings, metrics_dir: str, pool: Pool):
    from prometheus_client import CollectorRegistry, multiprocess
    from prometheus_client.core import CounterMetricFamily

    from vaeserve.service.metrics import serve_http

    class Restarts:
        def collect(self):
            yield CounterMetricFamily(
                "vaeserve_worker_restarts", "Workers restarted after dying", value=pool.restarts
            )

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=metrics_dir)
    registry.register(Restarts())
    return serve_http(settings.host, settings.metrics_port, registry)


def _die_with(supervisor: int) -> None:
    """A worker outlives no SIGKILLed supervisor: Linux sends it SIGTERM (it drains and exits)
    when the supervisor dies; elsewhere it is left to the orchestrator."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != supervisor:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _worker(index: int, count: int, settings: ServeSettings, level: int, serving: Event) -> None:
    """One worker process: a whole server, its log lines marked with its number."""
    from vaeserve.errors import VaeError
    from vaeserve.service.cli import run_on_event_loop
    from vaeserve.service.server import serve

    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s %(name)s [worker {index}/{count}]: %(message)s",
    )
    # The supervisor's handlers do not survive spawn; until the server installs its own, a
    # Ctrl-C must not print a traceback, and a SIGTERM (the supervisor stopping while this
    # worker starts) ends it at once: it has nothing to drain yet, and a SystemExit raised
    # inside a native module's import (onnxruntime's) surfaces as an ImportError traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda _number, _frame: os._exit(0))
    _die_with(int(os.environ[WORKER_ENV]))
    try:
        code = run_on_event_loop(serve(settings, serving.set), settings.event_loop)
    except VaeError as exc:
        logging.getLogger("vaeserve.service").error("%s", exc)
        code = 1
    raise SystemExit(code)
