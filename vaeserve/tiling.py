"""Tiled encoding and decoding of large images, blended exactly as diffusers blends them.

A latent-diffusion autoencoder (diffusers' ``AutoencoderKL``, ``AutoencoderTiny``) run on a large
image needs memory in proportion to the image; with ``enable_tiling()`` diffusers runs it on
overlapping tiles and blends the seams. vaeserve runs the same tiles through the same graphs and
blends them with the same arithmetic, so that a tiled decode equals diffusers' tiled decode:

- ``kl`` (``AutoencoderKL.tiled_decode`` and ``_tiled_encode``): tiles start every
  ``tile·(1 − overlap)`` input values; each output tile is blended linearly into the one above it
  and the one left of it over ``blend`` values, then cropped to ``limit = tile_out − blend`` and
  the crops laid side by side. The encoder's tiles blend its moments (mean and the log-variance
  before diffusers' clamp), so the stddev is derived after blending, as diffusers derives it.
- ``tiny`` (``AutoencoderTiny._tiled_encode`` and ``_tiled_decode``): tiles start every
  ``tile − blend`` values and are written into the output over what is there, through a ramp
  mask over their first ``blend`` values (not at the image's top or left edge).

Unlike diffusers, which holds every decoded tile until the end, the ``kl`` blend keeps only what
the next tiles blend with (the last ``blend`` rows of the row of tiles above and the last ``blend``
columns of the tile to the left), so peak memory is the output plus one row of tile strips and one
tile's activations, whatever the image's size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from vaeserve.errors import TensorError

STYLES = ("kl", "tiny")
# A graph on one tile: [N, C, h, w] in, its outputs (each [N, C', h', w']) out.
TileRun = Callable[[np.ndarray], tuple[np.ndarray, ...]]


@dataclass(frozen=True)
class Tiling:
    """How a model's large inputs are cut: its diffusers class's tile sizes and blending, as the
    manifest records them."""

    style: str  # kl or tiny
    sample_tile: int  # pixels per tile side (diffusers' tile_sample_min_size)
    latent_tile: int  # latents per tile side (tile_latent_min_size)
    overlap: float  # tile_overlap_factor
    downscale: int  # pixels per latent along a side

    @classmethod
    def parse(cls, raw: dict) -> Tiling:
        tiling = cls(
            str(raw["style"]),
            int(raw["sample_tile"]),
            int(raw["latent_tile"]),
            float(raw["overlap"]),
            int(raw["downscale"]),
        )
        if tiling.style not in STYLES:
            raise ValueError(f"tiling style {tiling.style!r}; expected one of {', '.join(STYLES)}")
        return tiling

    def to_dict(self) -> dict:
        return asdict(self)

    def with_sample_tile(self, pixels: int) -> Tiling:
        """Tiles of ``pixels`` per side (a flag's or a request's), the latent tile following."""
        if pixels < self.downscale * 2 or pixels % self.downscale:
            raise TensorError(
                f"tile size {pixels}: expected a multiple of {self.downscale} pixels (the model's "
                f"downscale factor), at least {self.downscale * 2}"
            )
        latent = pixels // self.downscale
        if self.style == "tiny" and int(latent * self.overlap) < 2:
            raise TensorError(f"tile size {pixels}: too small to blend; expected at least {self._tiny_min()}")
        return Tiling(self.style, pixels, latent, self.overlap, self.downscale)

    def _tiny_min(self) -> int:
        latent = 2
        while int(latent * self.overlap) < 2:
            latent += 1
        return latent * self.downscale

    # -- when to tile ---------------------------------------------------------------------------
    def encodes_tiled(self, height: int, width: int) -> bool:
        """An encode is tiled when the image is larger than a tile on either side, as diffusers'
        AutoencoderKL does with tiling on. (Its AutoencoderTiny with tiling on cuts every image,
        even one that fits: a 512² image against 512-pixel tiles into four, three of them
        slivers, 1.3× the work, its latents no longer the untiled encoder's. vaeserve runs an
        image that fits a tile whole, as diffusers does by default.)"""
        return height > self.sample_tile or width > self.sample_tile

    def decodes_tiled(self, height: int, width: int) -> bool:
        """... and a decode when the latent is larger than a latent tile."""
        return height > self.latent_tile or width > self.latent_tile

    # -- the two directions, as diffusers with enable_tiling(): in tiles when larger than one ------
    def encode(self, run: TileRun, images: np.ndarray) -> tuple[np.ndarray, ...]:
        """``run`` (the encoder graph) on ``images`` [N, C, H, W], over its tiles when diffusers
        would tile them; the (blended) outputs, as ``run`` gives them."""
        if self.encodes_tiled(*images.shape[2:]):
            return self.encode_tiles(run, images)
        return run(images)

    def decode(self, run: TileRun, latents: np.ndarray) -> tuple[np.ndarray, ...]:
        if self.decodes_tiled(*latents.shape[2:]):
            return self.decode_tiles(run, latents)
        return run(latents)

    def encode_tiles(self, run: TileRun, images: np.ndarray) -> tuple[np.ndarray, ...]:
        """``run`` over the tiles of ``images``, blended."""
        if self.style == "kl":
            step = int(self.sample_tile * (1 - self.overlap))
            blend = int(self.latent_tile * self.overlap)
            return _kl_tiles(run, images, self.sample_tile, step, blend, self.latent_tile - blend)
        blend = int(self.sample_tile * self.overlap)
        return _tiny_tiles(run, images, self.sample_tile, blend, 1 / self.downscale)

    def decode_tiles(self, run: TileRun, latents: np.ndarray) -> tuple[np.ndarray, ...]:
        if self.style == "kl":
            step = int(self.latent_tile * (1 - self.overlap))
            blend = int(self.sample_tile * self.overlap)
            return _kl_tiles(run, latents, self.latent_tile, step, blend, self.sample_tile - blend)
        blend = int(self.latent_tile * self.overlap)
        return _tiny_tiles(run, latents, self.latent_tile, blend, self.downscale)


def _starts(size: int, step: int) -> range:
    return range(0, size, step)


def _kl_tiles(
    run: TileRun, x: np.ndarray, tile: int, step: int, blend: int, limit: int
) -> tuple[np.ndarray, ...]:
    """AutoencoderKL's tiles: blend each output tile with the (blended) tile above and the one
    to its left, crop to ``limit``, and place the crops side by side."""
    height, width = x.shape[-2:]
    row_starts, col_starts = _starts(height, step), _starts(width, step)
    outputs: list[np.ndarray] | None = None
    above: dict[int, list[np.ndarray]] = {}  # column → the last `blend` rows of the tile above, blended
    top = 0
    for i in row_starts:
        left: list[np.ndarray] | None = None  # the last `blend` columns of the tile to the left
        below: dict[int, list[np.ndarray]] = {}
        col = 0
        row_height = 0
        for j, start in enumerate(col_starts):
            tiles = [np.array(t, np.float32) for t in run(x[..., i : i + tile, start : start + tile])]
            if outputs is None:
                outputs = [_kl_output(t, height, width, tile, step, limit) for t in tiles]
            for k, t in enumerate(tiles):
                if j in above:
                    _blend_rows(above[j][k], t, blend)
                if left is not None:
                    _blend_cols(left[k], t, blend)
            below[j] = [t[..., -blend:, :].copy() if blend else t[..., :0, :] for t in tiles]
            left = [t[..., -blend:].copy() if blend else t[..., :0] for t in tiles]
            crop = [t[..., :limit, :limit] for t in tiles]
            for out, c in zip(outputs, crop):
                out[..., top : top + c.shape[-2], col : col + c.shape[-1]] = c
            col += crop[0].shape[-1]
            row_height = crop[0].shape[-2]
        above = below
        top += row_height
    assert outputs is not None
    return tuple(outputs)


def _kl_output(t: np.ndarray, height: int, width: int, tile: int, step: int, limit: int) -> np.ndarray:
    """The blended output's buffer: the sum of the crops along each side."""
    ratio = t.shape[-1] / min(tile, width)  # output values per input value (tiles are whole factors)

    def side(size: int) -> int:
        return sum(min(limit, round(min(tile, size - s) * ratio)) for s in _starts(size, step))

    return np.zeros((*t.shape[:-2], side(height), side(width)), np.float32)


def _blend_rows(a: np.ndarray, b: np.ndarray, blend: int) -> None:
    """diffusers' blend_v, in place on b: a holds the last rows of the tile above."""
    extent = min(a.shape[-2], b.shape[-2], blend)
    for y in range(extent):
        b[..., y, :] = a[..., -extent + y, :] * (1 - y / extent) + b[..., y, :] * (y / extent)


def _blend_cols(a: np.ndarray, b: np.ndarray, blend: int) -> None:
    """diffusers' blend_h, in place on b: a holds the last columns of the tile to the left."""
    extent = min(a.shape[-1], b.shape[-1], blend)
    for x in range(extent):
        b[..., x] = a[..., -extent + x] * (1 - x / extent) + b[..., x] * (x / extent)


def _tiny_tiles(run: TileRun, x: np.ndarray, tile: int, blend: int, scale: float) -> tuple[np.ndarray, ...]:
    """AutoencoderTiny's tiles: each written over the output through a ramp over its first
    ``blend`` values (none at the top or left edge)."""
    height, width = x.shape[-2:]
    step = tile - blend
    out_tile, out_blend = round(tile * scale), round(blend * scale)
    ramp = np.clip(np.arange(out_tile, dtype=np.float32) / np.float32(out_blend - 1), 0, 1)
    outputs: list[np.ndarray] | None = None
    for i in _starts(height, step):
        for j in _starts(width, step):
            tiles = run(x[..., i : i + tile, j : j + tile])
            if outputs is None:
                size = (round(height * scale), round(width * scale))
                outputs = [np.zeros((*t.shape[:-2], *size), np.float32) for t in tiles]
            oi, oj = round(i * scale), round(j * scale)
            for out, t in zip(outputs, tiles):
                h, w = t.shape[-2:]
                rows = ramp[:h] if i else np.ones(h, np.float32)
                cols = ramp[:w] if j else np.ones(w, np.float32)
                mask = rows[:, None] * cols[None, :]
                region = out[..., oi : oi + h, oj : oj + w]
                region[...] = mask * t + (1 - mask) * region
    assert outputs is not None
    return tuple(outputs)
