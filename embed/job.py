"""`vae embed` and `vae score`: the job, from request to finished output, resumably.

It checks the request, describes the job in its sidecar (embed.sidecar), claims the output
(start, resume or, with --force, restart), streams the chunks through an engine (local
onnxruntime or the service, embed.pipeline; or Ray, embed.ray_engine), and marks the sidecar
``completed`` once the final file holds every row in input order. A failure keeps what
``--resume`` can use, or removes everything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from vaeserve.atomic import disk_full_said
from vaeserve.embed.encoders import (
    ChunkEncoder,
    LatentEncoder,
    LocalEncoder,
    LocalScorer,
    ServiceEncoder,
    ServiceScorer,
)
from vaeserve.embed.pipeline import embed_chunks
from vaeserve.embed.sidecar import Sidecar
from vaeserve.embed.sinks import FORMATS, ChunkSink, open_sink, record_dtype, score_dtype
from vaeserve.embed.sources import Source, image_size_of, open_source
from vaeserve.errors import ConfigError, DataError, TensorError, VaeError
from vaeserve.ood import FLAG_TAIL, REFERENCE_IW_SAMPLES, flag_percentiles, log_px_meaning
from vaeserve.remote_repository import open_model
from vaeserve.repository import ModelVersion
from vaeserve.storage import Location, remove


@dataclass(frozen=True)
class EmbedRequest:
    model: Location
    input: Location
    output: Location
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
    iw_samples: int = REFERENCE_IW_SAMPLES
    seed: int = 0
    # An imported autoencoder's (vae import --diffusers): every image at this [height, width]
    # (resized to it; None: the input's own size, one for all), latents scaled as a pipeline's.
    image_size: tuple[int, int] | None = None
    pipeline_latents: bool = False
    # ... and the job's images [H, W, C], as run() found them (None for a VAE's job).
    autoencoder_images: tuple[int, int, int] | None = None

    def records(self, version: ModelVersion) -> np.dtype:
        """The output's record: latents, or scores."""
        if self.score:
            return score_dtype(self.flag_percentiles(version) is not None)
        return record_dtype(self.shapes(version)[1], self.stddev)

    def shapes(self, version: ModelVersion) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The job's image shape (as sources read it) and each row's latent shape: the model's,
        or for an imported autoencoder [H, W, 3] and [C, H/f, W/f]."""
        record = version.manifest.autoencoder
        if record is None or self.autoencoder_images is None:
            return version.image_shape, (version.latent_size,)
        height, width, _ = self.autoencoder_images
        f = record.downscale
        return self.autoencoder_images, (record.latent_channels, height // f, width // f)

    @property
    def lowest_value(self) -> float:
        """Float inputs' range starts here: [0, 1] for a VAE, [−1, 1] for an imported autoencoder."""
        return -1.0 if self.autoencoder_images is not None else 0.0

    def flag_percentiles(self, version: ModelVersion) -> dict[str, float] | None:
        """The reference ood_flag compares with: the manifest's, when recorded at this k."""
        return flag_percentiles(version.manifest.score_reference, self.iw_samples)


def run(request: EmbedRequest, progress: bool = True) -> dict[str, Any]:
    if request.output.suffix not in FORMATS:
        raise ConfigError(f"--output {request.output}: expected a .npy or .parquet file")
    if request.chunk_rows < 1:
        raise ConfigError("--chunk-rows must be at least 1")
    if request.threads < 0:
        raise ConfigError("--threads must be 0 (one per core) or more")
    if request.score and (request.iw_samples < 1 or request.seed < 0):
        raise ConfigError("vae score needs --iw-samples >= 1 and --seed >= 0")
    version = open_model(request.model)
    if version.manifest.autoencoder is not None:
        request = for_autoencoder(request, version)
    elif request.image_size or request.pipeline_latents:
        raise ConfigError(
            f"--image-size and --pipeline-latents are an imported autoencoder's; {version.name} is a VAE "
            "trained by vae train (its images are resized to its own shape)"
        )
    image_shape, _ = request.shapes(version)
    source = open_source(
        request.input, image_shape, request.column, request.key, resize=request.image_size is not None
    )
    if source.columns != math.prod(image_shape):
        raise DataError(
            f"{request.input}: rows of {source.columns} values; model {version.name}/"
            f"{version.version} expects {math.prod(image_shape)}"
        )
    job = describe(request, version, source)
    if request.resume and not request.force and _already_complete(request, job):
        return _summary(request, job, source.rows, 0, 0.0, complete_before=True)
    started = time.perf_counter()
    if request.engine == "ray":
        done = embed_on_ray(request, job, version, source.read_rows, progress)
    else:
        done = embed_locally(request, job, version, source, progress)
    job.completed_at(datetime.now(timezone.utc).isoformat(timespec="seconds")).write(request.output)
    return _summary(request, job, source.rows, done, time.perf_counter() - started)


def for_autoencoder(request: EmbedRequest, version: ModelVersion) -> EmbedRequest:
    """The request with its images' shape: --image-size, else the input's own (its first image
    file's size, or its array's); each side a multiple of the model's downscale factor."""
    record = version.manifest.autoencoder
    assert record is not None
    if request.score:
        raise ConfigError(
            f"vae score: {version.name} is an imported {record.diffusers_class}, which defines no "
            "likelihood to score with; vae embed writes its latents"
        )
    height, width = request.image_size or image_size_of(request.input, request.key)
    f = record.downscale
    if height % f or width % f or min(height, width) < f:
        raise ConfigError(
            f"images of {height}×{width}: {version.name} takes sides that are multiples of {f}; "
            "pass --image-size H W to resize them"
        )
    return dataclasses.replace(request, autoencoder_images=(height, width, record.image_channels))


def _summary(
    request: EmbedRequest, job: Sidecar, rows: int, done: int, seconds: float, complete_before: bool = False
) -> dict[str, Any]:
    return {
        "score": job.score,
        "rows": rows,
        "embedded_now": done,
        "seconds": seconds,
        "rows_per_s": done / seconds if seconds else 0.0,
        "output": str(request.output),
        "complete_before": complete_before,
    }


def _already_complete(request: EmbedRequest, job: Sidecar) -> bool:
    """--resume of a job that finished: nothing to do, if it is this job (same model, input,
    chunking and fields) and its output is there."""
    previous = Sidecar.read(request.output)
    if previous is None or not previous.completed or not request.output.exists():
        return False
    changed = job.differences(previous)
    if changed:
        raise ConfigError(
            f"{request.output} is complete but was made with other {', '.join(changed)}; "
            "pass --force to overwrite it"
        )
    return True


def embed_locally(
    request: EmbedRequest, job: Sidecar, version: ModelVersion, source: Source, progress: bool
) -> int:
    dtype = request.records(version)
    sink = open_sink(request.output, source.rows, request.chunk_rows, dtype)
    claim_output(request, job, sink)
    try:
        with _disk_full_said(request.output):
            finished = sink.start(request.resume)
            engine = encoder(request, version)
            try:
                done = embed_chunks(
                    source, engine, sink, finished, job, dtype, progress, request.lowest_value
                )
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


def _disk_full_said(output: Location) -> contextlib.AbstractContextManager:
    return disk_full_said(output.parent) if isinstance(output, Path) else contextlib.nullcontext()


def settle_failure(request: EmbedRequest, sink: ChunkSink, exc: BaseException) -> None:
    """Keep what a --resume can use, remove the rest, and say which in the error. No chunk
    finished: nothing to resume. The input's fault (NaN, wrong values): the input must change,
    and a changed input is not resumed."""
    kept = set() if _input_fault(exc) else sink.finished()
    if kept:
        note = f"{len(kept)} finished chunks kept: --resume continues the job"
    else:
        sink.remove()
        Sidecar.path(request.output).unlink(missing_ok=True)
        note = "nothing resumable, so nothing kept"
    if isinstance(exc, VaeError) and exc.args:
        exc.args = (f"{exc.args[0]}; {note}", *exc.args[1:])
    elif isinstance(exc, KeyboardInterrupt):
        exc.args = (note,)  # said by vae's interrupt line


def _input_fault(exc: BaseException) -> bool:
    from vaeserve.client import ServiceError

    if isinstance(exc, ServiceError):
        return exc.code.name == "INVALID_ARGUMENT"
    return isinstance(exc, (DataError, TensorError))


def embed_on_ray(
    request: EmbedRequest, job: Sidecar, version: ModelVersion, read_rows: int, progress: bool
) -> int:
    """Ray tasks read, encode and write their own chunks as parts of a partitioned dataset."""
    from vaeserve.embed.ray_engine import run_ray

    if request.server:
        raise ConfigError("--engine ray encodes in its own tasks; it takes no --server")
    dtype = request.records(version)
    sink = open_sink(request.output, job.rows, request.chunk_rows, dtype, dataset=True)
    claim_output(request, job, sink)
    try:
        finished = sink.start(request.resume)
        done = run_ray(request, job, finished, read_rows, progress)
        sink.finish()
    except BaseException as exc:
        settle_failure(request, sink, exc)
        raise
    return done


def describe(request: EmbedRequest, version: ModelVersion, source: Source) -> Sidecar:
    """The job's sidecar, not yet completed."""
    fields = ["row_id", "mean", *(["stddev"] if request.stddev else [])]
    score = None
    if request.score:
        fields = list(request.records(version).names)
        reference = version.manifest.score_reference
        if request.flag_percentiles(version) is not None:
            tails = f"{FLAG_TAIL:g} % tails"
            flag = f"ood_flag: -1/+1 outside the test set's {tails} of ood_score at k = {request.iw_samples}"
        elif reference:
            flag = f"no ood_flag: the reference percentiles are at k = {reference['iw_samples']}"
        else:
            flag = "no ood_flag: this version records no reference percentiles (export it again)"
        score = {
            "iw_samples": request.iw_samples,
            "log_px": log_px_meaning(request.iw_samples),
            "ood_flag": flag,
            "seed": request.seed,
            "decoder_sha256": version.manifest.graphs["decoder"].sha256,
            "likelihood": version.likelihood.name,
        }
    return Sidecar(
        model={
            "name": version.name,
            "version": version.version,
            "encoder_sha256": version.manifest.graphs["encoder"].sha256,
        },
        engine=_engine(request),
        input=source.fingerprint(),
        rows=source.rows,
        chunk_rows=request.chunk_rows,
        chunks=-(-source.rows // request.chunk_rows),
        fields=fields,
        score=score,
        latent_size=math.prod(request.shapes(version)[1]),
        output=str(request.output),
        latent_shape=list(request.shapes(version)[1]),
        pipeline_latents=request.pipeline_latents,
    )


def _engine(request: EmbedRequest) -> str:
    if request.engine == "ray":
        return f"ray {request.ray_address or 'local'} ({request.workers} tasks at a time)"
    if request.server:
        return f"service {request.server}" + (" (shared memory)" if request.shared_memory else "")
    return "local onnxruntime"


def claim_output(request: EmbedRequest, job: Sidecar, sink: ChunkSink) -> None:
    """Refuse to clobber finished or foreign work; start fresh, resume, or (--force) restart."""
    previous = Sidecar.read(request.output)
    if request.force:
        sink.remove()
        remove(request.output)
    elif previous and previous.completed:
        raise ConfigError(f"{request.output} is complete; pass --force to overwrite it")
    elif request.resume:
        if previous is None:
            raise ConfigError(f"nothing to resume: no {Sidecar.path(request.output).name}")
        changed = job.differences(previous)
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
    if isinstance(request.output, Path):
        request.output.parent.mkdir(parents=True, exist_ok=True)
    job.write(request.output)


def encoder(request: EmbedRequest, version: ModelVersion) -> ChunkEncoder:
    options = {"token": request.token, "root_certificates": request.tls_ca}
    if request.score:
        if request.server is None:
            return LocalScorer(version, request.iw_samples, request.seed, request.threads)
        return ServiceScorer(version, request.server, request.iw_samples, request.seed, **options)
    if request.autoencoder_images is not None:
        if request.server is None:
            return LatentEncoder(
                version, request.autoencoder_images, request.pipeline_latents, request.threads
            )
        if request.shared_memory:
            raise ConfigError(
                "--shared-memory carries a VAE's fixed-size rows; embed this autoencoder without it"
            )
        images = request.autoencoder_images
        return ServiceEncoder(
            version, request.server, images=images, pipeline=request.pipeline_latents, **options
        )
    if request.server is None:
        return LocalEncoder(version, request.threads)
    return ServiceEncoder(version, request.server, shared_memory=request.shared_memory, **options)
