"""The data plane: loaded model versions, the four uses of a model and scoring, in numpy.

Nothing here knows gRPC. A ``ServedModel`` runs its encoder and decoder through
batchers and draws every random number from the request's own generator, so a
seeded request gives bit-identical results however the server is loaded.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from concurrent.futures import Executor

import numpy as np

from vaeserve import codec
from vaeserve._proto import vae_pb2
from vaeserve.datasets import encoder_inputs
from vaeserve.elbo import likelihood_sample
from vaeserve.errors import ModelNotFoundError, RepositoryError, TensorError, VaeError
from vaeserve.ood import scores
from vaeserve.repository import ModelVersion, load_version, model_names, read_labels, version_numbers
from vaeserve.runtime import CPU, OnnxPair, usable_cores
from vaeserve.service.batching import Batcher, Direct, Observer, Run, Runner
from vaeserve.service.settings import ServeSettings

log = logging.getLogger(__name__)


def generator(seed: int | None) -> np.random.Generator:
    """The request's randomness: seeded (PCG64, identical on every platform) or fresh."""
    return np.random.default_rng(seed)


def bernoulli(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (rng.random(probs.shape, dtype=np.float32) < probs).astype(np.uint8)


SAMPLE_DTYPES = {"bernoulli": "UINT8", "continuous-bernoulli": "FP32"}


class ServedModel:
    def __init__(
        self,
        version: ModelVersion,
        pair: OnnxPair,
        small: OnnxPair,
        settings: ServeSettings,
        executor: Executor,
        observer: Observer,
    ) -> None:
        self.version = version
        self.pair = pair
        self.small = small
        self.settings = settings
        self.ref = vae_pb2.ModelRef(name=version.name, version=version.version)
        label = f"{version.name}/{version.version}"
        self.binarization = version.manifest.get("binarization", "none")
        self.likelihood = version.likelihood
        self.executor = executor
        limit = settings.max_request_rows
        # Raw uint8 pixels (prepared as in training when the encoder runs), or float32 model
        # inputs, which must lie in [0, 1]; latents are float32 and finite.
        self.pixels = codec.Rows(version.input_size, limit, uint8=True, low=0.0, high=1.0)
        self.latent_rows = codec.Rows(version.latent_size, limit, uint8=False)
        inline, parts = settings.inline_max_rows, parallel_runs(settings, pair.provider)
        encoder = Runner(self._prepared(small.encode), self._prepared(pair.encode), executor, inline, parts)
        decoder = Runner(small.decode, pair.decode, executor, inline, parts)
        self.encoder = self._batcher(encoder, f"{label} encoder", observer)
        self.decoder = self._batcher(decoder, f"{label} decoder", observer)

    def _prepared(self, encode: Run) -> Run:
        """Raw uint8 pixels are prepared where the encoder runs (on the executor's threads, in
        parallel pieces), not on the event loop, which has every other call to answer."""

        def run(rows: np.ndarray) -> tuple[np.ndarray, ...]:
            return encode(encoder_inputs(rows, self.binarization))

        return run

    def _batcher(self, runner: Runner, name: str, observer: Observer) -> Batcher | Direct:
        if not self.settings.batching:
            return Direct(runner, name, self.settings.max_queue_rows, observer)
        delay = self.settings.batch_max_delay_ms / 1000
        return Batcher(
            runner, name, self.settings.batch_max_rows, delay, self.settings.max_queue_rows, observer
        )

    def warm_up(self) -> None:
        """One run at batch 1 and one at the largest merged batch, before reporting SERVING."""
        for session in {id(self.small): self.small, id(self.pair): self.pair}.values():  # one on CPU
            for rows in (1, self.settings.batch_max_rows):
                session.encode(np.zeros((rows, self.version.input_size), np.float32))
                session.decode(np.zeros((rows, self.version.latent_size), np.float32))

    def count(self, count: int) -> int:
        if not 1 <= count <= self.settings.max_request_rows:
            raise TensorError(f"count: {count}; expected 1 to {self.settings.max_request_rows}")
        return count

    # -- the four uses ----------------------------------------------------------------------------
    async def encode(self, x: np.ndarray, sample: bool, seed: int | None) -> dict[str, np.ndarray]:
        mean, stddev = await self.encoder.submit(x, alone=seed is not None)
        out = {"mean": mean, "stddev": stddev}
        if sample:
            out["z"] = mean + stddev * generator(seed).standard_normal(mean.shape, dtype=np.float32)
        return out

    async def decode(self, z: np.ndarray, sample: bool, seed: int | None) -> dict[str, np.ndarray]:
        logits, probs = await self.decoder.submit(z, alone=seed is not None)
        out = {"probs": probs}
        if sample:
            out["samples"] = self._draw(logits, probs, generator(seed))
        return out

    async def reconstruct(self, x: np.ndarray, use_mean: bool, seed: int | None) -> dict[str, np.ndarray]:
        rng = generator(seed)
        mean, stddev = await self.encoder.submit(x, alone=seed is not None)
        z = mean if use_mean else mean + stddev * rng.standard_normal(mean.shape, dtype=np.float32)
        logits, probs = await self.decoder.submit(np.ascontiguousarray(z, np.float32), alone=seed is not None)
        return {"probs": probs, "samples": self._draw(logits, probs, rng), "latents": z}

    async def sample_prior(self, count: int, seed: int | None) -> dict[str, np.ndarray]:
        rng = generator(seed)
        z = rng.standard_normal((count, self.version.latent_size), dtype=np.float32)
        logits, probs = await self.decoder.submit(z, alone=seed is not None)
        return {"latents": z, "probs": probs, "samples": self._draw(logits, probs, rng)}

    def _draw(self, logits: np.ndarray, probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """x ~ p(x|z): uint8 0/1 from a Bernoulli, float32 in [0, 1] from a continuous one."""
        if self.likelihood == "bernoulli":
            return bernoulli(probs, rng)
        return likelihood_sample(logits, self.likelihood, rng)

    async def score(
        self, x: np.ndarray, iw_samples: int, seed: int | None, row_offset: int = 0
    ) -> dict[str, np.ndarray]:
        """Per row: the ELBO, log p(x) with k importance samples (the evaluator's estimator,
        vaeserve.evaluation) and the input-complexity OOD score; on the model's executor."""
        k = self.iw_samples(iw_samples)
        inputs = encoder_inputs(x, self.binarization)

        run = functools.partial(
            scores,
            self.pair.encode,
            self.pair.decode_logits,
            inputs,
            k,
            seed,
            self.likelihood,
            self.version.image_shape,
            row_offset,
        )
        return await asyncio.get_running_loop().run_in_executor(self.executor, run)

    def iw_samples(self, k: int) -> int:
        """k as asked (0 means 1), within the server's --max-iw-samples."""
        k = k or 1
        if not 1 <= k <= self.settings.max_iw_samples:
            raise TensorError(f"iw_samples: {k}; expected 1 to {self.settings.max_iw_samples}")
        return k

    def info(self, is_default: bool) -> vae_pb2.ModelInfo:
        evaluation = self.version.manifest.get("evaluation") or {}
        metrics = {k: float(v) for k, v in evaluation.items() if isinstance(v, int | float)}
        reference = self.version.manifest.get("score_reference") or {}
        for field, percentiles in reference.get("percentiles", {}).items():
            metrics.update({f"{field}_p{p}": float(v) for p, v in percentiles.items()})
        return vae_pb2.ModelInfo(
            name=self.version.name,
            version=self.version.version,
            input_size=self.version.input_size,
            latent_size=self.version.latent_size,
            image_shape=self.version.image_shape,
            execution_provider=self.pair.provider,
            variant=self.settings.variant,
            binarization=self.binarization,
            metrics=metrics,
            is_default=is_default,
            max_batch_rows=self.settings.max_request_rows,
            likelihood=self.likelihood,
        )


class ModelRegistry:
    """Every loaded version, by name and number, and the models' version labels; resolves what
    a request names. ``generation`` changes with every load, retirement or label change, so
    that what is cached from a resolution (OIP's endpoints) knows when to look again."""

    def __init__(
        self, models: dict[str, dict[int, ServedModel]], default: str, labels: dict | None = None
    ) -> None:
        self.models = models
        self.default = default
        self.labels: dict[str, dict[str, int]] = labels or {}
        self.generation = 0

    @classmethod
    def load(cls, settings: ServeSettings, executor: Executor, observer: Observer) -> ModelRegistry:
        found = find_servable(settings, log_refusals=True)  # nothing to serve: one error saying why
        models: dict[str, dict[int, ServedModel]] = {}
        for name, versions in found.items():
            for number, version in versions.items():
                served = load_one(settings, name, number, executor, observer, version)
                if served is not None:
                    models.setdefault(name, {})[number] = served
        if not models:
            raise VaeError(
                f"no servable model in {settings.repo} (model {settings.model or 'any'}, "
                f"version {settings.version}): onnxruntime could not open any; see the log lines above"
            )
        default = settings.model if settings.model in models else sorted(models)[0]
        registry = cls(models, default)
        for name in models:
            try:
                registry.set_labels(name, read_labels(settings.repo / name))
            except RepositoryError as exc:
                log.error("refusing the labels of %s: %s", name, exc)
        return registry

    def resolve(self, name: str, version: str) -> ServedModel:
        name = name or self.default
        if name not in self.models:
            raise ModelNotFoundError(f"model {name!r} is not loaded; loaded: {sorted(self.models)}")
        versions = self.models[name]
        if version in ("", "latest"):
            return versions[max(versions)]
        number = int(version) if version.isdecimal() else self.labels.get(name, {}).get(version)
        if number not in versions:
            labels = self.labels.get(name, {})
            what = "version" if version.isdecimal() else "version or label"
            raise ModelNotFoundError(
                f"model {name!r} has no loaded {what} {version!r}; loaded: {sorted(versions)}"
                + (f", labels: {', '.join(f'{k}={v}' for k, v in sorted(labels.items()))}" if labels else "")
            )
        return versions[number]

    def add(self, served: ServedModel) -> None:
        self.models.setdefault(served.version.name, {})[served.version.version] = served
        self.generation += 1

    def retire(self, name: str, number: int) -> ServedModel:
        """Out of the registry: new calls no longer reach it; calls holding it finish, and its
        sessions are released with the last reference. A model's last version takes the model
        (and its labels) with it."""
        served = self.models[name].pop(number)
        if not self.models[name]:
            del self.models[name]
            self.labels.pop(name, None)
        self.generation += 1
        return served

    def set_labels(self, name: str, labels: dict[str, int]) -> None:
        """Replace a model's labels, all or none: each must name a loaded version."""
        loaded = self.models.get(name, {})
        dangling = {label: v for label, v in labels.items() if v not in loaded}
        if dangling:
            raise RepositoryError(
                f"labels {dangling} name versions that are not loaded (loaded: {sorted(loaded)}); "
                "the labels in effect stay"
            )
        if self.labels.get(name, {}) != labels:
            self.labels[name] = dict(labels)
            self.generation += 1

    def all(self) -> list[ServedModel]:
        return [m for name in sorted(self.models) for _, m in sorted(self.models[name].items())]

    def describe(self, name: str = "") -> list[vae_pb2.ModelInfo]:
        if name and name not in self.models:
            raise ModelNotFoundError(f"model {name!r} is not loaded; loaded: {sorted(self.models)}")
        return [
            m.info(m.version.name == self.default) for m in self.all() if not name or m.version.name == name
        ]

    def start(self) -> None:
        for model in self.all():
            model.encoder.start()
            model.decoder.start()

    async def stop(self) -> None:
        for model in self.all():
            await model.encoder.stop()
            await model.decoder.stop()


def parallel_runs(settings: ServeSettings, provider: str) -> int:
    """Pieces a large CPU batch is cut into (one per thread); a GPU takes batches whole."""
    if provider != CPU:
        return 1
    return settings.threads or usable_cores()


def wanted_versions(settings: ServeSettings, name: str) -> list[int]:
    """The versions of a model in the repository that --version asks to serve."""
    numbers = version_numbers(settings.repo / name)
    if settings.version == "all":
        return numbers
    if settings.version == "latest":
        return numbers[-1:]
    return [int(settings.version)] if int(settings.version) in numbers else []


def find_servable(settings: ServeSettings, log_refusals: bool = False) -> dict[str, dict[int, ModelVersion]]:
    """The versions vae serve would load, verified (manifest, sizes, checksums) but not opened;
    where there is none, a RepositoryError that says why, each reason once (the supervisor
    checks before its workers start, so a bad --model is one message, not one per worker).
    ``log_refusals``: log why each version left out was, when others are servable."""
    names = [settings.model] if settings.model else model_names(settings.repo)
    found: dict[str, dict[int, ModelVersion]] = {}
    reasons = []
    for name in names:
        wanted = wanted_versions(settings, name)
        if not wanted:
            reasons.append(_no_version(settings, name))
        for number in wanted:
            try:
                found.setdefault(name, {})[number] = load_version(settings.repo / name / str(number))
            except RepositoryError as exc:
                reasons.append(str(exc))
    if not found:
        why = "; ".join(reasons) or "it holds no model versions (NAME/VERSION folders that vae export writes)"
        raise RepositoryError(f"no servable model in {settings.repo}: {why}")
    for reason in reasons if log_refusals else []:
        log.error("refusing %s", reason)
    return found


def _no_version(settings: ServeSettings, name: str) -> str:
    numbers = version_numbers(settings.repo / name)
    if not numbers:
        return f"no model {name!r} (models there: {', '.join(model_names(settings.repo)) or 'none'})"
    return f"model {name!r} has no version {settings.version} (has {numbers})"


def load_one(
    settings: ServeSettings,
    name: str,
    number: int,
    executor: Executor,
    observer: Observer,
    version: ModelVersion | None = None,
) -> ServedModel | None:
    """``open_version``, or None with a log line saying why not."""
    try:
        return open_version(settings, name, number, executor, observer, version)
    except VaeError as exc:
        log.error("refusing %s: %s", settings.repo / name / str(number), exc)
        return None


def open_version(
    settings: ServeSettings,
    name: str,
    number: int,
    executor: Executor,
    observer: Observer,
    version: ModelVersion | None = None,
) -> ServedModel:
    """A version loaded and verified (checksums, shapes), ready to warm up; VaeError if not.
    ``version``: already verified (find_servable), not read again."""
    path = settings.repo / name / str(number)
    version = version or load_version(path)
    small = OnnxPair.load(version, settings.device, 1, settings.variant)
    # On CPU every run uses the one-thread session (large batches in parallel pieces).
    pair = small
    if small.provider != CPU:
        pair = OnnxPair.load(version, settings.device, 0, settings.variant)
    log.info(
        "loaded %s: D=%d, M=%d, variant %s on %s",
        path,
        version.input_size,
        version.latent_size,
        settings.variant,
        pair.provider,
    )
    return ServedModel(version, pair, small, settings, executor, observer)
