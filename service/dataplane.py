"""The data plane: loaded model versions, the four uses of a model and scoring, in numpy.

Every front end (vae.v1, OIP over gRPC and HTTP) calls these and nothing else, and nothing
here knows a protocol. A ``ServedModel`` runs its encoder and decoder through batchers (or,
batching off, straight, bounded by admission) and its scoring through admission, and draws every
random number from the request's own generator, so a seeded request gives bit-identical results
however the server is loaded. Loading and unloading are ``service.manager``'s.
"""

from __future__ import annotations

import asyncio
import functools
import math
import random
import threading
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from vaeserve.datasets import encoder_inputs
from vaeserve.errors import ModelNotFoundError, RepositoryError, RequestError, TensorError
from vaeserve.layout import ImageLayout
from vaeserve.ood import REFERENCE_IW_SAMPLES, scores
from vaeserve.repository import ModelVersion, TrafficSplit
from vaeserve.rows import Rows
from vaeserve.runtime import CPU, OnnxPair, usable_cores
from vaeserve.service.batching import Admission, Batcher, Direct, Observer, Run, Runner, deadline
from vaeserve.service.cache import ResponseCache
from vaeserve.service.errors import AbandonedError, OverloadedError
from vaeserve.service.metrics import CALL_MODEL
from vaeserve.service.residency import NotResidentError
from vaeserve.service.settings import ServeSettings
from vaeserve.service.shadow import SHADOW
from vaeserve.service.uses import drawn_with_seed_or_not_at_all, seeded, use


def generator(seed: int | None) -> np.random.Generator:
    """The request's randomness: seeded (PCG64, identical on every platform) or fresh."""
    return np.random.default_rng(seed)


@dataclass(frozen=True)
class ModelSummary:
    """What a loaded version tells about itself (vae.v1's ModelInfo has the same fields)."""

    name: str
    version: int
    input_size: int
    latent_size: int
    image_shape: tuple[int, ...]
    execution_provider: str
    variant: str
    binarization: str
    likelihood: str
    max_batch_rows: int
    is_default: bool
    metrics: dict[str, float] = field(default_factory=dict)
    family: str = "vae"  # or "autoencoder": imported by vae import --diffusers (service.autoencoders)


class ServedModel:
    family = "vae"
    cache: ResponseCache | None = None  # --cache-mb: the manager's, shared by every version
    cache_key = b""  # service.cache.version_key: what names this version's answers there
    in_flight = None  # vaeserve_in_flight_calls{model}'s child (service.uses)
    mirror = None  # service.shadow.Mirror: where a routed call's copy for its shadow goes

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
        label = f"{version.name}/{version.version}"
        self.binarization = version.manifest.binarization
        self.likelihood = version.likelihood
        self.prior = version.load_prior()
        self.executor = executor
        limit = settings.max_request_rows
        # Raw uint8 pixels (prepared as in training when the encoder runs), or float32 model
        # inputs, which must lie in [0, 1]; latents are float32 and finite.
        # Images come as rows or channels first, [N, C, H, W] (vaeserve.layout).
        layout = ImageLayout.of(version.image_shape)
        image = layout.channels_first if layout is not None else ()
        self.pixels = Rows(version.input_size, limit, uint8=True, low=0.0, high=1.0, image=image)
        # Images go back as the graphs give them: [N, C, H, W] from a conv model, rows from an mlp.
        self.row_shape = pair.row_shape
        self.latent_rows = Rows(version.latent_size, limit, uint8=False)
        inline, parts = settings.inline_max_rows, parallel_runs(settings, pair.provider)
        encoder = Runner(self._prepared(small.encode), self._prepared(pair.encode), executor, inline, parts)
        decoder = Runner(small.decode, pair.decode, executor, inline, parts)
        self.encoder = self._batcher(encoder, f"{label} encoder", observer)
        self.decoder = self._batcher(decoder, f"{label} decoder", observer)
        # Score's work is its decoder rows, rows × k, on the executor: bounded like any long run,
        # as many rows at the reference k as a graph's queue holds.
        self.scorer = Admission(
            f"{label} scorer", settings.max_queue_rows * REFERENCE_IW_SAMPLES, "decoder rows (rows × k)"
        )

    def _prepared(self, encode: Run) -> Run:
        """Raw uint8 pixels are prepared where the encoder runs (on the executor's threads, in
        parallel pieces), not on the event loop, which has every other call to answer. The
        closure holds the binarization, not ``self``: the runner it goes into is ``self``'s, and a
        cycle would keep a retired version's sessions until a full garbage collection, not free
        them when its last call ends (service.manager's "released" line)."""
        binarization = self.binarization

        def run(rows: np.ndarray) -> tuple[np.ndarray, ...]:
            return encode(encoder_inputs(rows, binarization))

        return run

    def _batcher(self, runner: Runner, name: str, observer: Observer) -> Batcher | Direct:
        if not self.settings.batching:
            return Direct(runner, name, self.settings.max_queue_rows, observer)
        delay = self.settings.batch_max_delay_ms / 1000
        return Batcher(
            runner, name, self.settings.batch_max_rows, delay, self.settings.max_queue_rows, observer
        )

    @property
    def provider(self) -> str:
        return self.pair.provider

    def start(self) -> None:
        self.encoder.start()
        self.decoder.start()

    async def stop(self) -> None:
        await self.encoder.stop()
        await self.decoder.stop()

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
    @use(drawn_with_seed_or_not_at_all)
    async def encode(self, x: np.ndarray, sample: bool, seed: int | None) -> dict[str, np.ndarray]:
        mean, stddev = await self.encoder.submit(x, alone=seed is not None)
        out = {"mean": mean, "stddev": stddev}
        if sample:
            out["z"] = mean + stddev * generator(seed).standard_normal(mean.shape, dtype=np.float32)
        return out

    @use(drawn_with_seed_or_not_at_all)
    async def decode(self, z: np.ndarray, sample: bool, seed: int | None) -> dict[str, np.ndarray]:
        logits, probs = await self.decoder.submit(z, alone=seed is not None)
        # Latents finite but huge (3e38) overflow inside the graph: NaN is no answer. One
        # reduction: a sum of values in [0, 1] is finite unless one of them is not.
        if not math.isfinite(float(probs.sum(dtype=np.float64))):
            raise TensorError(
                "latents: the decoder's output is NaN or infinite for these latents; they are far "
                "outside the prior (a standard normal's draws lie within about ±6)"
            )
        out = {"probs": self._images(probs)}
        if sample:
            out["samples"] = self._images(self._draw(logits, probs, generator(seed)))
        return out

    @use(seeded)
    async def reconstruct(self, x: np.ndarray, use_mean: bool, seed: int | None) -> dict[str, np.ndarray]:
        rng = generator(seed)
        mean, stddev = await self.encoder.submit(x, alone=seed is not None)
        z = mean if use_mean else mean + stddev * rng.standard_normal(mean.shape, dtype=np.float32)
        logits, probs = await self.decoder.submit(np.ascontiguousarray(z, np.float32), alone=seed is not None)
        return {
            "probs": self._images(probs),
            "samples": self._images(self._draw(logits, probs, rng)),
            "latents": z,
        }

    @use(seeded)
    async def sample_prior(self, count: int, seed: int | None) -> dict[str, np.ndarray]:
        rng = generator(seed)
        z = self.prior.sample(count, self.version.latent_size, rng)
        logits, probs = await self.decoder.submit(z, alone=seed is not None)
        return {
            "latents": z,
            "probs": self._images(probs),
            "samples": self._images(self._draw(logits, probs, rng)),
        }

    def _images(self, rows: np.ndarray) -> np.ndarray:
        """Rows [N, D] as the graphs shape a row (a view): [N, C, H, W] for images, else as is."""
        return rows.reshape(len(rows), *self.row_shape)

    def _draw(self, logits: np.ndarray, probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """x ~ p(x|z): uint8 0/1 from a Bernoulli (against the graph's probs, its mean), float32
        in [0, 1] from the others."""
        return self.likelihood.draw(logits, probs, rng)

    @use(seeded)
    async def score(
        self, x: np.ndarray, iw_samples: int, seed: int | None, row_offset: int = 0
    ) -> dict[str, np.ndarray]:
        """Per row: the ELBO, log p(x) with k importance samples (the evaluator's estimator,
        vaeserve.evaluation) and the input-complexity OOD score; on the model's executor, once
        admitted, weighed as rows × k decoder rows."""
        k = self.iw_samples(iw_samples)
        work = len(x) * k
        if work > self.scorer.max_queue_rows:  # as an Encode over the queue: never admitted
            raise OverloadedError(
                f"Score of {len(x)} rows × k = {k}: {work} decoder rows, more than this server's "
                f"scorer takes at once ({self.scorer.max_queue_rows}, --max-queue-rows × "
                f"{REFERENCE_IW_SAMPLES}); send at most {self.scorer.max_queue_rows // k} rows per "
                "call at this k"
            )
        with self.scorer.holding(work):
            return await self._score(x, k, seed, row_offset)

    async def _score(self, x: np.ndarray, k: int, seed: int | None, row_offset: int) -> dict[str, np.ndarray]:
        inputs = encoder_inputs(x, self.binarization)
        abandoned, until = threading.Event(), deadline.get()

        def checkpoint() -> None:
            """Between waves of the run: a call cancelled (caller gone) or past its deadline
            stops there, instead of burning the cores for an answer no one will read."""
            if abandoned.is_set():
                raise AbandonedError("the caller left; its Score stopped")
            if until is not None and time.monotonic() > until:
                raise AbandonedError("the call's deadline passed; its Score stopped")

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
            self.prior,
            checkpoint,
        )
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, run)
        except asyncio.CancelledError:  # a queued run never starts; a running one stops at its next wave
            abandoned.set()
            raise

    def iw_samples(self, k: int) -> int:
        """k as asked (0: the reference's, vaeserve.ood.REFERENCE_IW_SAMPLES, the k of the test-set
        percentiles a score is placed among), within the server's --max-iw-samples."""
        k = k or REFERENCE_IW_SAMPLES
        if not 1 <= k <= self.settings.max_iw_samples:
            raise TensorError(f"iw_samples: {k}; expected 1 to {self.settings.max_iw_samples}")
        return k

    def summary(self, is_default: bool) -> ModelSummary:
        manifest = self.version.manifest
        return ModelSummary(
            name=self.version.name,
            version=self.version.version,
            input_size=self.version.input_size,
            latent_size=self.version.latent_size,
            image_shape=self.version.image_shape,
            execution_provider=self.pair.provider,
            variant=self.settings.variant,
            binarization=self.binarization,
            likelihood=self.likelihood.name,
            max_batch_rows=self.settings.max_request_rows,
            is_default=is_default,
            metrics={**manifest.evaluation_metrics(), **manifest.reference_metrics()},
        )


# Versions are numbers a repository folder holds; longer ones name none (and would cost int()).
MAX_VERSION_DIGITS = 18


class ModelRegistry:
    """Every loaded version, by name and number, and the models' version labels; resolves what
    a request names. ``generation`` changes with every load, retirement or label change, so
    that what is cached from a resolution (OIP's endpoints) knows when to look again."""

    def __init__(
        self, models: dict[str, dict[int, ServedModel]], default: str | None, labels: dict | None = None
    ) -> None:
        self.models = models
        self.default = default
        self.labels: dict[str, dict[str, int]] = labels or {}
        self.traffic: dict[str, TrafficSplit] = {}  # vae traffic: how unversioned calls are split
        # Bounded residency (service.residency): servable models not loaded now, loaded on demand,
        # and when each model was last called (the least recently called is evicted first).
        self.evicted: set[str] = set()
        self.residency = None
        self.last_used: dict[str, float] = {}
        self.generation = 0

    def resolve(self, name: str, version: str) -> ServedModel:
        if not name and self.default is None:
            raise RequestError(
                f"no model named, and this server has no default among {sorted(self.models)}: "
                "name one in the request (vae client --model NAME), or start the server with "
                "--default-model NAME"
            )
        name = name or self.default
        if name not in self.models:
            if name in self.evicted:
                raise NotResidentError(name, self.residency)
            raise ModelNotFoundError(f"model {name!r} is not loaded; loaded: {sorted(self.models)}")
        versions = self.models[name]
        CALL_MODEL.set(name)
        self.last_used[name] = time.monotonic()
        if not version and name in self.traffic:
            return self._route(name, versions)
        SHADOW.set(None)
        if version in ("", "latest"):
            return versions[max(versions)]
        if version.isdecimal() and len(version) > MAX_VERSION_DIGITS:  # int() refuses 4,300 digits
            raise ModelNotFoundError(f"model {name!r} has no version of {len(version)} digits")
        number = int(version) if version.isdecimal() else self.labels.get(name, {}).get(version)
        if number not in versions:
            labels = self.labels.get(name, {})
            what = "version" if version.isdecimal() else "version or label"
            raise ModelNotFoundError(
                f"model {name!r} has no loaded {what} {version!r}; loaded: {sorted(versions)}"
                + (f", labels: {', '.join(f'{k}={v}' for k, v in sorted(labels.items()))}" if labels else "")
            )
        return versions[number]

    def _route(self, name: str, versions: dict[int, ServedModel]) -> ServedModel:
        """A call that named no version, by the model's traffic split: a routed version drawn by
        weight among those loaded (the latest when none is), and the split's shadow, if loaded
        and not the one answering, put in SHADOW for the data plane to mirror the call to."""
        split = self.traffic[name]
        routed = [(n, w) for key, w in split.weights.items() if (n := self.number(name, key)) in versions]
        if routed:
            numbers, weights = zip(*routed, strict=True)
            chosen = random.choices(numbers, weights)[0]
        else:
            chosen = max(versions)
        shadow = self.number(name, split.shadow) if split.shadow else None
        SHADOW.set(versions[shadow] if shadow in versions and shadow != chosen else None)
        return versions[chosen]

    def number(self, name: str, key: str) -> int | None:
        """A version number or a label's version (None for a label not set)."""
        return int(key) if key.isdecimal() else self.labels.get(name, {}).get(key)

    def set_traffic(self, name: str, split: TrafficSplit | None) -> None:
        if split is None:
            self.traffic.pop(name, None)
        else:
            self.traffic[name] = split
        self.generation += 1

    def routes(self, name: str) -> dict | None:
        """The split in effect, as the console shows it: each key's share and version, the shadow's."""
        split = self.traffic.get(name)
        if split is None:
            return None
        return {
            "shares": [
                {"key": key, "version": self.number(name, key), "share": share}
                for key, share in split.shares().items()
            ],
            "shadow": {"key": split.shadow, "version": self.number(name, split.shadow)}
            if split.shadow
            else None,
        }

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
            self.traffic.pop(name, None)
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

    def describe(self, name: str = "") -> list[ModelSummary]:
        if name and name not in self.models:
            raise ModelNotFoundError(f"model {name!r} is not loaded; loaded: {sorted(self.models)}")
        return [
            m.summary(m.version.name == self.default)
            for m in self.all()
            if not name or m.version.name == name
        ]

    def start(self) -> None:
        for model in self.all():
            model.start()

    async def stop(self) -> None:
        for model in self.all():
            await model.stop()


def parallel_runs(settings: ServeSettings, provider: str) -> int:
    """Pieces a large CPU batch is cut into (one per thread); a GPU takes batches whole."""
    if provider != CPU:
        return 1
    return settings.threads or usable_cores()
