"""`vae embed` and `vae score`: stream a dataset through the encoder (or the scores), chunk by
chunk, resumably.

A sidecar ``DST.manifest.json`` names the model (name, version, encoder SHA-256), the
input (path and fingerprint), the chunking and the fields, and says ``completed`` only
once the final file holds every row in input order. ``--resume`` continues a job whose
sidecar matches, skipping chunks already written; anything else that would touch an
existing output needs ``--force``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from vaeserve import __version__
from vaeserve.atomic import atomic_write_text, disk_full_said
from vaeserve.embed.encoders import (
    ChunkEncoder,
    LocalEncoder,
    LocalScorer,
    ServiceEncoder,
    ServiceScorer,
    Wait,
)
from vaeserve.embed.sinks import FORMATS, ChunkSink, aligned_records, open_sink, record_dtype, score_dtype
from vaeserve.embed.sources import Source, open_source
from vaeserve.errors import ConfigError, DataError, TensorError, VaeError
from vaeserve.repository import ModelVersion, open_path


@dataclass(frozen=True)
class EmbedRequest:
    model: Path
    input: Path
    output: Path
    server: str | None = None
    stddev: bool = False
    resume: bool = False
    force: bool = False
    chunk_rows: int = 8192
    column: str | None = None
    key: str | None = None
    token: str | None = None
    tls_ca: Path | None = None
    threads: int = 0
    engine: str = "local"
    ray_address: str | None = None
    workers: int = 2
    shared_memory: bool = False
    score: bool = False  # vae score: per-row scores instead of latents
    iw_samples: int = 1
    seed: int = 0

    def records(self, version: ModelVersion) -> np.dtype:
        """The output's record: latents, or scores."""
        return score_dtype() if self.score else record_dtype(version.latent_size, self.stddev)


# What a resumed job must share with the one it continues.
RESUME_KEYS = ("model", "input", "rows", "chunk_rows", "fields", "score")


def sidecar_path(output: Path) -> Path:
    return output.with_name(output.name + ".manifest.json")


def run(request: EmbedRequest, progress: bool = True) -> dict[str, Any]:
    if request.output.suffix not in FORMATS:
        raise ConfigError(f"--output {request.output}: expected a .npy or .parquet file")
    if request.chunk_rows < 1:
        raise ConfigError("--chunk-rows must be at least 1")
    if request.threads < 0:
        raise ConfigError("--threads must be 0 (one per core) or more")
    if request.score and (request.engine == "ray" or request.iw_samples < 1 or request.seed < 0):
        raise ConfigError(
            "vae score runs locally or through --server, with --iw-samples >= 1 and --seed >= 0"
        )
    version = open_path(request.model)
    source = open_source(request.input, version.image_shape, request.column, request.key)
    if source.columns != version.input_size:
        raise DataError(
            f"{request.input}: rows of {source.columns} values; model {version.name}/"
            f"{version.version} expects {version.input_size}"
        )
    manifest = describe(request, version, source)
    if request.resume and not request.force and _already_complete(request, manifest):
        return _summary(request, source.rows, 0, 0.0, complete_before=True)
    started = time.perf_counter()
    if request.engine == "ray":
        done = embed_on_ray(request, manifest, version)
    else:
        done = embed_locally(request, manifest, version, source, progress)
    manifest.update(completed=True, finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    atomic_write_text(sidecar_path(request.output), json.dumps(manifest, indent=2) + "\n")
    return _summary(request, source.rows, done, time.perf_counter() - started)


def _summary(
    request: EmbedRequest, rows: int, done: int, seconds: float, complete_before: bool = False
) -> dict[str, Any]:
    return {
        "rows": rows,
        "embedded_now": done,
        "seconds": seconds,
        "rows_per_s": done / seconds if seconds else 0.0,
        "output": str(request.output),
        "complete_before": complete_before,
    }


def _already_complete(request: EmbedRequest, manifest: dict[str, Any]) -> bool:
    """--resume of a job that finished: nothing to do, if it is this job (same model, input,
    chunking and fields) and its output is there."""
    sidecar = sidecar_path(request.output)
    previous = json.loads(sidecar.read_text()) if sidecar.exists() else {}
    if not previous.get("completed") or not request.output.exists():
        return False
    changed = [k for k in RESUME_KEYS if previous.get(k) != manifest.get(k)]
    if changed:
        raise ConfigError(
            f"{request.output} is complete but was made with other {', '.join(changed)}; "
            "pass --force to overwrite it"
        )
    return True


def embed_locally(
    request: EmbedRequest, manifest: dict[str, Any], version: ModelVersion, source: Source, progress: bool
) -> int:
    dtype = request.records(version)
    sink = open_sink(request.output, source.rows, request.chunk_rows, dtype)
    claim_output(request, manifest, sink)
    try:
        with disk_full_said(request.output.parent):
            finished = sink.start(request.resume)
            engine = encoder(request, version)
            try:
                done = embed_chunks(source, engine, sink, finished, manifest, dtype, progress)
            finally:
                engine.close()
            sink.finish()
    except BaseException as exc:
        sink.close()
        settle_failure(request, sink, exc)
        raise
    finally:
        sink.close()
    return done


def settle_failure(request: EmbedRequest, sink: ChunkSink, exc: BaseException) -> None:
    """Keep what a --resume can use, remove the rest, and say which in the error. No chunk
    finished: nothing to resume. The input's fault (NaN, wrong values): the input must change,
    and a changed input is not resumed."""
    kept = set() if _input_fault(exc) else sink.finished()
    if kept:
        note = f"{len(kept)} finished chunks kept: --resume continues the job"
    else:
        sink.remove()
        sidecar_path(request.output).unlink(missing_ok=True)
        note = "nothing resumable, so nothing kept"
    if isinstance(exc, VaeError) and exc.args:
        exc.args = (f"{exc.args[0]}; {note}", *exc.args[1:])


def _input_fault(exc: BaseException) -> bool:
    from vaeserve.client import ServiceError

    if isinstance(exc, ServiceError):
        return exc.code.name == "INVALID_ARGUMENT"
    return isinstance(exc, (DataError, TensorError))


def embed_on_ray(request: EmbedRequest, manifest: dict[str, Any], version: ModelVersion) -> int:
    """Ray writes a folder of Parquet files; it appears under its name only once complete."""
    from vaeserve.embed.ray_engine import run_ray

    if request.output.suffix != ".parquet" or request.server or request.resume:
        raise ConfigError(
            "--engine ray writes Parquet (--output DST.parquet), encodes in its own actors "
            "(no --server) and retries failed tasks itself (no --resume)"
        )
    dtype = record_dtype(version.latent_size, request.stddev)
    claim_output(request, manifest, open_sink(request.output, manifest["rows"], request.chunk_rows, dtype))
    staging = request.output.with_name(f".{request.output.name}.ray-tmp")
    shutil.rmtree(staging, ignore_errors=True)
    run_ray(
        request.model,
        request.input,
        staging,
        manifest["chunks"],
        request.chunk_rows,
        version.image_shape,
        request.stddev,
        request.column,
        request.key,
        request.ray_address,
        request.workers,
    )
    if request.output.exists():
        shutil.rmtree(request.output) if request.output.is_dir() else request.output.unlink()
    os.replace(staging, request.output)
    return manifest["rows"]


def describe(request: EmbedRequest, version: ModelVersion, source: Source) -> dict[str, Any]:
    fields = ["row_id", "mean", *(["stddev"] if request.stddev else [])]
    score = None
    if request.score:
        fields = list(request.records(version).names)
        score = {
            "iw_samples": request.iw_samples,
            "seed": request.seed,
            "decoder_sha256": version.manifest["graphs"]["decoder"]["sha256"],
            "likelihood": version.likelihood,
        }
    return {
        "vaeserve_version": __version__,
        "model": {
            "name": version.name,
            "version": version.version,
            "encoder_sha256": version.manifest["graphs"]["encoder"]["sha256"],
        },
        "engine": _engine(request),
        "input": source.fingerprint(),
        "rows": source.rows,
        "chunk_rows": request.chunk_rows,
        "chunks": -(-source.rows // request.chunk_rows),
        "fields": fields,
        "score": score,
        "latent_size": version.latent_size,
        "output": str(request.output),
        "completed": False,
    }


def _engine(request: EmbedRequest) -> str:
    if request.engine == "ray":
        return f"ray {request.ray_address or 'local'} ({request.workers} actors)"
    if request.server:
        return f"service {request.server}" + (" (shared memory)" if request.shared_memory else "")
    return "local onnxruntime"


def claim_output(request: EmbedRequest, manifest: dict[str, Any], sink: ChunkSink) -> None:
    """Refuse to clobber finished or foreign work; start fresh, resume, or (--force) restart."""
    sidecar = sidecar_path(request.output)
    previous = json.loads(sidecar.read_text()) if sidecar.exists() else None
    if request.force:
        sink.remove()
        if request.output.is_dir():
            shutil.rmtree(request.output)
        request.output.unlink(missing_ok=True)
    elif previous and previous.get("completed"):
        raise ConfigError(f"{request.output} is complete; pass --force to overwrite it")
    elif request.resume:
        if previous is None:
            raise ConfigError(f"nothing to resume: no {sidecar.name}")
        changed = [k for k in RESUME_KEYS if previous.get(k) != manifest.get(k)]
        if changed:
            raise ConfigError(
                f"cannot resume {request.output}: {', '.join(changed)} differ from the "
                "interrupted job; pass --force to start over"
            )
    elif previous is not None or sink.leftovers() or request.output.exists():
        raise ConfigError(
            f"{request.output} (or its parts) exists from an unfinished job; "
            "pass --resume to continue it or --force to start over"
        )
    request.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(sidecar, json.dumps(manifest, indent=2) + "\n")


def encoder(request: EmbedRequest, version: ModelVersion) -> ChunkEncoder:
    options = {"token": request.token, "root_certificates": request.tls_ca}
    if request.score:
        if request.server is None:
            return LocalScorer(version, request.iw_samples, request.seed, request.threads)
        return ServiceScorer(version, request.server, request.iw_samples, request.seed, **options)
    if request.server is None:
        return LocalEncoder(version, request.threads)
    return ServiceEncoder(version, request.server, shared_memory=request.shared_memory, **options)


def embed_chunks(
    source: Source,
    engine: ChunkEncoder,
    sink: ChunkSink,
    finished: set[int],
    manifest: dict[str, Any],
    dtype: np.dtype,
    progress: bool,
) -> int:
    chunk_rows = manifest["chunk_rows"]
    first = next((i for i in range(manifest["chunks"]) if i not in finished), manifest["chunks"])
    todo = set(range(first, manifest["chunks"])) - finished
    done = 0
    initial = min(first * chunk_rows, source.rows)
    bar = tqdm(
        total=source.rows,
        initial=initial,
        unit="rows",
        desc="score" if manifest["score"] else "embed",
        disable=None if progress else True,
    )
    with bar, ChunkPipeline(engine, sink, dtype, chunk_rows, bar.update) as pipeline:
        for index, rows in _prefetched(source.chunks(chunk_rows, first), source, chunk_rows, first):
            if index in todo:
                pipeline.add(index, rows)
                done += len(rows)
        pipeline.drain()
    return done


# The next chunk starts encoding before the last one is collected.
CHUNKS_IN_FLIGHT = 2


class ChunkPipeline:
    """Chunks in flight: up to two encoding (so the encoder never idles at a chunk
    boundary) while the one before is written on a worker thread. Record buffers are
    recycled once written, so memory stays at a handful of chunks and the kernel does
    not zero fresh pages for every chunk."""

    def __init__(
        self, engine: ChunkEncoder, sink: ChunkSink, dtype: np.dtype, chunk_rows: int, written: Callable
    ) -> None:
        self.engine, self.sink, self.dtype, self.chunk_rows = engine, sink, dtype, chunk_rows
        self.written = written
        self.encoding: deque[tuple[int, np.ndarray, np.ndarray, Wait]] = deque()
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="embed-write")
        self.writing: Future | None = None
        self.spare: list[np.ndarray] = []

    def add(self, index: int, rows: np.ndarray) -> None:
        buffer = self.spare.pop() if self.spare else aligned_records(self.chunk_rows, self.dtype)
        records = buffer[: len(rows)]
        records["row_id"] = np.arange(index * self.chunk_rows, index * self.chunk_rows + len(rows))
        self.encoding.append((index, buffer, records, self.engine.start(rows, records)))
        if len(self.encoding) >= CHUNKS_IN_FLIGHT:
            self._collect()

    def drain(self) -> None:
        while self.encoding:
            self._collect()
        self._wait_for_write()

    def _collect(self) -> None:
        index, buffer, records, encoded = self.encoding.popleft()
        encoded()
        self._wait_for_write()
        self.writing = self.writer.submit(self._write, index, buffer, records)

    def _write(self, index: int, buffer: np.ndarray, records: np.ndarray) -> np.ndarray:
        self.sink.write(index, records)
        self.written(len(records))
        return buffer

    def _wait_for_write(self) -> None:
        if self.writing is not None:
            self.spare.append(self.writing.result())
            self.writing = None

    def __enter__(self) -> ChunkPipeline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.writer.shutdown(cancel_futures=True)


def _prefetched(
    chunks: Iterator[np.ndarray], source: Source, chunk_rows: int, first: int
) -> Iterator[tuple[int, np.ndarray]]:
    """Read and check the next chunk on a worker thread while the current ones are encoded."""

    def following(index: int) -> np.ndarray | None:
        rows = next(chunks, None)
        return None if rows is None else check_rows(rows, source, index * chunk_rows)

    with ThreadPoolExecutor(1, thread_name_prefix="embed-read") as reader:
        index = first
        pending = reader.submit(following, index)
        while (rows := pending.result()) is not None:
            pending = reader.submit(following, index + 1)
            yield index, rows
            index += 1


def check_rows(rows: np.ndarray, source: Source, start: int) -> np.ndarray:
    """uint8 pixels pass; other numbers must be finite and in [0, 1], else the row is named."""
    if rows.dtype == np.uint8:
        return rows
    if not (np.issubdtype(rows.dtype, np.floating) or np.issubdtype(rows.dtype, np.integer)):
        raise DataError(f"{source.path}: dtype {rows.dtype} cannot be converted to pixels")
    values = rows.astype(np.float32)
    bad = ~np.isfinite(values) | (values < 0) | (values > 1)
    if bad.any():
        row, column = np.argwhere(bad)[0]
        raise DataError(
            f"{source.path}: row {start + row}, column {column} is {values[row, column]}; "
            "pixels must be uint8 or finite values in [0, 1]"
        )
    return values
