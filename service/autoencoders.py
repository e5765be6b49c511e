"""The data plane of an imported latent-diffusion autoencoder (``vae import --diffusers``).

Images of any size the model takes go in and out, so nothing here is rows: Encode maps images
[N, 3, H, W] to the latent distribution's mean and stddev [N, C, H/f, W/f], Decode latents back
to images, Reconstruct does both, SamplePrior decodes N(0, I) latents of a requested size. Inputs
larger than the model's tile are run in tiles blended as diffusers' ``enable_tiling()`` blends
them (vaeserve.tiling), so memory follows the tile, not the image. Every front end (vae.v1, OIP
over gRPC and HTTP) calls these methods as it calls ``ServedModel``'s, with the same admission,
seeds and errors; there is no Score, as these models define no p(x|z).

Pixels: uint8 p is read as p / 127.5 − 1, as diffusers' image processor reads it; float32 must
lie in [−1, 1]. Latents are the autoencoder's own unless a request asks for a pipeline's,
(z − shift_factor) · scaling_factor, on the way out of Encode and into Decode.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from vaeserve.errors import RequestError, TensorError, UnsupportedError
from vaeserve.repository import ModelVersion
from vaeserve.rows import Rows
from vaeserve.runtime import AutoencoderGraphs
from vaeserve.service import tracing
from vaeserve.service.batching import Admission
from vaeserve.service.cache import ResponseCache
from vaeserve.service.dataplane import ModelSummary, ServedModel
from vaeserve.service.settings import ServeSettings
from vaeserve.service.uses import drawn_with_seed_or_not_at_all, seeded, use
from vaeserve.tiling import Tiling

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatentOptions:
    """What a request may ask of an imported autoencoder besides its tensors."""

    pipeline_latents: bool = False  # latents as a pipeline has them: (z − shift) · scale
    tile_size: int = 0  # tile side in pixels; 0: the server's (--tile-size) or the model's
    height: int = 0  # SamplePrior: the latents' height and width; 0: a tile's
    width: int = 0


DEFAULT_OPTIONS = LatentOptions()


class ServedAutoencoder:
    family = "autoencoder"
    cache: ResponseCache | None = None  # as ServedModel's
    cache_key = b""
    in_flight = None
    mirror = None  # service.shadow.Mirror: where a routed call's copy for its shadow goes

    def __init__(self, version: ModelVersion, settings: ServeSettings, executor: Executor) -> None:
        record = version.manifest.autoencoder
        assert record is not None
        self.version = version
        self.record = record
        self.settings = settings
        self.executor = executor
        self.graphs = AutoencoderGraphs(version, settings.device, settings.threads, settings.variant)
        self.provider = self.graphs.provider
        self.tiling = self._tiling(settings.tile_size) if settings.tile_size else record.tiling
        f, c = record.downscale, record.latent_channels
        limit, pixels = settings.max_request_rows, settings.max_request_pixels
        channels = record.image_channels
        self.pixels = Rows(
            0,
            limit,
            uint8=True,
            low=-1.0,
            high=1.0,
            image=(channels, 0, 0),
            multiple=f,
            max_values=pixels * channels,
        )
        # Latents bounded so that the images they decode to stay within --max-request-pixels.
        self.latent_rows = Rows(0, limit, uint8=False, image=(c, 0, 0), max_values=pixels // (f * f) * c)
        self.row_shape = (channels, -1, -1)
        self.latent_shape = (c, -1, -1)
        label = f"{version.name}/{version.version}"
        # Work in flight, in pixels: a 4096² decode weighs as 256 of 256² (--max-queue-rows pixels'
        # worth of 256 × 256 images per graph).
        capacity = max(pixels, settings.max_queue_rows * 256 * 256)
        self.encoding = Admission(f"{label} encoder", capacity, "pixels")
        self.decoding = Admission(f"{label} decoder", capacity, "pixels")

    # -- what front ends ask ----------------------------------------------------------------------
    def count(self, count: int) -> int:
        if not 1 <= count <= self.settings.max_request_rows:
            raise TensorError(f"count: {count}; expected 1 to {self.settings.max_request_rows}")
        return count

    def _tiling(self, pixels: int) -> Tiling:
        return self.record.tiling.with_sample_tile(pixels)

    def tiling_for(self, options: LatentOptions) -> Tiling:
        return self._tiling(options.tile_size) if options.tile_size else self.tiling

    # -- the uses --------------------------------------------------------------------------------
    @use(drawn_with_seed_or_not_at_all)
    async def encode(
        self, x: np.ndarray, sample: bool, seed: int | None, options: LatentOptions = DEFAULT_OPTIONS
    ) -> dict[str, np.ndarray]:
        mean, stddev = await self._encode(x, options)
        out = {"mean": mean, "stddev": stddev}
        if sample:
            out["z"] = mean + stddev * np.random.default_rng(seed).standard_normal(
                mean.shape, dtype=np.float32
            )
        return self.graphs.pipeline_encoding(out) if options.pipeline_latents else out

    @use(drawn_with_seed_or_not_at_all)
    async def decode(
        self, z: np.ndarray, sample: bool, seed: int | None, options: LatentOptions = DEFAULT_OPTIONS
    ) -> dict[str, np.ndarray]:
        if sample:
            raise RequestError(
                f"sample: {self.record.diffusers_class}'s decoder is deterministic, it has no p(x|z) to "
                "draw from; ask without sample"
            )
        if options.pipeline_latents:
            z = self.graphs.from_pipeline(z)
        return {"images": await self._decode(z, options)}

    @use(seeded)
    async def reconstruct(
        self, x: np.ndarray, use_mean: bool, seed: int | None, options: LatentOptions = DEFAULT_OPTIONS
    ) -> dict[str, np.ndarray]:
        """Images → z (the mean, or a draw of q(z|x)) → images; the latents as asked."""
        mean, stddev = await self._encode(x, options)
        z = mean
        if not use_mean and self.record.stochastic:
            z = mean + stddev * np.random.default_rng(seed).standard_normal(mean.shape, dtype=np.float32)
        images = await self._decode(z, options)
        return {"images": images, "latents": self.graphs.to_pipeline(z) if options.pipeline_latents else z}

    @use(seeded)
    async def sample_prior(
        self, count: int, seed: int | None, options: LatentOptions = DEFAULT_OPTIONS
    ) -> dict[str, np.ndarray]:
        """N(0, I) latents [count, C, h, w] (a tile's size unless asked), decoded as Decode would
        (read as a pipeline's latents with pipeline_latents)."""
        tiling = self.tiling_for(options)
        height, width = options.height or tiling.latent_tile, options.width or tiling.latent_tile
        shape = (count, self.record.latent_channels, height, width)
        if min(height, width) < 1:
            raise TensorError(f"height, width: {height}, {width}; expected positive latent sizes")
        if math.prod(shape) > self.latent_rows.max_values:
            raise TensorError(
                f"count × height × width: latents {list(shape)} would decode to more pixels than this "
                f"server's limit of {self.settings.max_request_pixels:,} per request (--max-request-pixels)"
            )
        z = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
        raw = self.graphs.from_pipeline(z) if options.pipeline_latents else z
        return {"latents": z, "images": await self._decode(raw, options)}

    async def score(self, x: np.ndarray, iw_samples: int, seed: int | None, row_offset: int = 0) -> dict:
        raise UnsupportedError(
            f"Score: {self.version.name} is an imported {self.record.diffusers_class}, which defines no "
            "likelihood p(x|z) to score with; Score is for VAEs trained by vae train"
        )

    # -- running the graphs -----------------------------------------------------------------------
    async def _encode(self, x: np.ndarray, options: LatentOptions) -> tuple[np.ndarray, np.ndarray]:
        tiling = self.tiling_for(options)
        images = x.shape[0] * x.shape[2] * x.shape[3]
        with self.encoding.holding(images):
            return await self._run(lambda: self.graphs.encode(x, tiling))

    async def _decode(self, z: np.ndarray, options: LatentOptions) -> np.ndarray:
        tiling = self.tiling_for(options)
        f = self.record.downscale
        pixels = z.shape[0] * z.shape[2] * z.shape[3] * f * f
        with self.decoding.holding(pixels):
            images = await self._run(lambda: self.graphs.decode(z, tiling))
        if not math.isfinite(float(images.sum(dtype=np.float64))):
            raise TensorError(
                "latents: the decoder's output is NaN or infinite for these latents; they are far outside "
                "what the encoder gives (pipeline latents sent without pipeline_latents?)"
            )
        return images

    async def _run(self, work: Callable):
        started = tracing.now()
        done = await asyncio.get_running_loop().run_in_executor(self.executor, work)
        tracing.record("run", started, graph=self.version.name)
        return done

    # -- as the registry and the manager use a model ---------------------------------------------
    def warm_up(self) -> None:
        f, c = self.record.downscale, self.record.latent_channels
        self.graphs.encode(np.zeros((1, self.record.image_channels, 4 * f, 4 * f), np.float32), self.tiling)
        self.graphs.decode(np.zeros((1, c, 4, 4), np.float32), self.tiling)

    def summary(self, is_default: bool) -> ModelSummary:
        return ModelSummary(
            name=self.version.name,
            version=self.version.version,
            input_size=0,  # images of any size
            latent_size=self.record.latent_channels,
            image_shape=(),
            execution_provider=self.provider,
            variant=self.settings.variant,
            binarization="none",
            likelihood="none",
            max_batch_rows=self.settings.max_request_rows,
            is_default=is_default,
            family=self.family,
        )

    def start(self) -> None:
        """Nothing to start: no batcher (images of different sizes do not merge)."""

    async def stop(self) -> None:
        """Nothing to stop."""


# What a registry holds: a VAE trained here, or an imported autoencoder (same front-end methods).
Served = ServedModel | ServedAutoencoder


def options_for(model: Served, options: LatentOptions) -> tuple[LatentOptions, ...]:
    """The options to pass an autoencoder's method (none to a VAE's); a VAE asked for them
    refuses, rather than answering as if they had been applied."""
    if isinstance(model, ServedAutoencoder):
        return (options,)
    if options != DEFAULT_OPTIONS:
        raise RequestError(
            f"pipeline_latents, tile_size, height and width apply to imported autoencoders; "
            f"{model.version.name} is a VAE trained by vae train"
        )
    return ()
