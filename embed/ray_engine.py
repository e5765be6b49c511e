"""`vae embed/score --engine ray`: the job as Ray tasks, on a local Ray or a cluster by address.

Each task takes a run of consecutive chunks: it opens the input (a file, a folder or a prefix of
parts, local or on object storage), reads them with the local engine's readers, encodes or
scores each with the local engine's onnxruntime code (one thread), and writes each as
``DST/part-NNNNNN.parquet``; it returns the rows written. A run spans the input's natural read
unit (a Parquet row group): reading one chunk decodes its whole row group, so one task per chunk
would read a file of 65,536-row groups eight times over with 8,192-row chunks. A worker process
keeps the model, the opened input and the session between tasks. The driver keeps ``--workers``
tasks in flight, counts rows, and writes the dataset's marker when every part is there.

On a cluster the nodes share nothing but the store: input and output on object storage, the
model fetched from it into each node's cache (vaeserve.remote_repository), credentials from
each node's environment. A task lost with its node is run again elsewhere (Ray's
``max_retries``); a task that fails on the data (NaN, wrong width) fails the job at once with its
message. A driver killed: ``--resume`` lists the parts written and submits only the rest.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from tqdm import tqdm

from vaeserve.errors import ClusterError, MissingExtraError, VaeError

# Runs of one task lost to dead workers or nodes before the job fails.
MAX_RETRIES = 4

# Per worker process: what the last task opened, reused while the job is the same.
_opened: dict[str, Any] = {}


def encode_chunks(request: Any, first: int, count: int, chunks: int) -> int:
    """Read, encode and write chunks ``first`` .. ``first + count - 1``; the rows written."""
    from vaeserve.embed.pipeline import check_rows

    job = _open_job(request, chunks)
    done = 0
    reader = job["source"].chunks(request.chunk_rows, first)
    for index in range(first, first + count):
        start = index * request.chunk_rows
        rows = check_rows(next(reader), job["source"], start, request.lowest_value)
        records = np.empty(len(rows), job["dtype"])
        records["row_id"] = np.arange(start, start + len(rows))
        job["engine"].start(rows, records)()
        job["sink"].write(index, records)
        done += len(rows)
    return done


def task_runs(todo: list[int], per_task: int) -> list[tuple[int, int]]:
    """``todo`` (ascending chunk numbers) as (first, count) runs of consecutive chunks, at most
    ``per_task`` long, each within one read unit of ``per_task`` chunks."""
    runs: list[tuple[int, int]] = []
    for index in todo:
        if runs and runs[-1][0] + runs[-1][1] == index and index % per_task:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((index, 1))
    return runs


def _open_job(request: Any, chunks: int) -> dict[str, Any]:
    from vaeserve.embed.job import encoder
    from vaeserve.embed.sinks import DatasetParts
    from vaeserve.embed.sources import open_source
    from vaeserve.remote_repository import open_model

    key = repr((request, chunks))
    if _opened.get("key") != key:
        if "engine" in _opened:
            _opened["engine"].close()
        _opened.clear()
        version = open_model(request.model)
        dtype = request.records(version)
        _opened.update(
            key=key,
            source=open_source(
                request.input,
                request.shapes(version)[0],
                request.column,
                request.key,
                resize=request.image_size is not None,
            ),
            engine=encoder(request, version),
            dtype=dtype,
            sink=DatasetParts(request.output, chunks, dtype),
        )
    return _opened


def run_ray(request: Any, job: Any, finished: set[int], read_rows: int, progress: bool) -> int:
    """Every chunk not in ``finished`` encoded and written by Ray tasks; the rows done now.
    ``read_rows``: the input's read unit (rows a reader decodes at once; 0 when it has none)."""
    ray = _import_ray()
    _connect(ray, request.ray_address)
    task = ray.remote(num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=False)(encode_chunks)
    # Each task encodes on one thread, locally (no --server inside a task).
    each = dataclasses.replace(request, threads=1, server=None, engine="local")
    per_task = max(1, -(-read_rows // job.chunk_rows))
    todo = task_runs([i for i in range(job.chunks) if i not in finished], per_task)
    already = sum(min(job.chunk_rows, job.rows - i * job.chunk_rows) for i in finished)
    done = 0
    bar = tqdm(
        total=job.rows,
        initial=already,
        unit="rows",
        desc=("score" if request.score else "embed") + " (ray)",
        disable=None if progress else True,
    )
    pending: dict[Any, tuple[int, int]] = {}
    try:
        with bar:
            while todo or pending:
                while todo and len(pending) < max(request.workers, 1):
                    first, count = todo.pop(0)
                    pending[task.remote(each, first, count, job.chunks)] = (first, count)
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    first, _count = pending.pop(ref)
                    rows = _result(ray, ref, first)
                    done += rows
                    bar.update(rows)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        ray.shutdown()
    return done


def _result(ray: Any, ref: Any, index: int) -> int:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, VaeError):
            raise cause from None
        raise
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.RayError) as exc:
        raise ClusterError(
            f"the task of chunk {index} was lost {MAX_RETRIES + 1} times with its worker or node "
            f"({type(exc).__name__}); the parts written are kept: --resume continues the job"
        ) from None


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise MissingExtraError("--engine ray", "ray", "ray") from None
    return ray


def _connect(ray: Any, address: str | None) -> None:
    """A cluster by address (``HOST:6379``, ``ray://HOST:10001``), else a Ray of this machine."""
    options: dict[str, Any] = {"log_to_driver": False, "logging_level": "ERROR"}
    if address is None:
        options.update(address="local", include_dashboard=False)
    else:
        options.update(address=address)
    try:
        ray.init(**options)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {exc}") from None
