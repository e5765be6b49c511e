"""How an image is laid out, decided here once for every stage that looks at rows as images.

Files and arrays hold images as [N, H, W] (grey) or [N, H, W, C] (channels last, as numpy and PIL
have them); a model's ``image_shape`` (its manifest's) is that [H, W] or [H, W, C]. The graphs
and the wire carry images channels first, [N, C, H, W], as PyTorch, ONNX and Triton users send
them; and a row, wherever rows are flat ([N, D], D = C · H · W: training, the data plane, Score,
embeddings' inputs), is one image flattened channels first, so that the wire's and the graphs'
tensors are views of it. Grey images read the same either way. Rows whose shape is neither (a
flat [D] vector) are not images: they have no layout, and pictures of them are not drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vaeserve.errors import TensorError

# Channel counts drawn in colour (RGB, RGBA); others are drawn as their first channel, in grey.
COLOUR_CHANNELS = (3, 4)


@dataclass(frozen=True)
class ImageLayout:
    height: int
    width: int
    channels: int

    @classmethod
    def of(cls, image_shape: tuple[int, ...]) -> ImageLayout | None:
        """The layout of rows that are images of ``image_shape``; None for flat vectors."""
        shape = tuple(int(n) for n in image_shape)
        if len(shape) == 2:
            return cls(shape[0], shape[1], 1)
        if len(shape) == 3:
            return cls(*shape)
        return None

    @property
    def size(self) -> int:
        return self.height * self.width * self.channels

    @property
    def colour(self) -> bool:
        return self.channels in COLOUR_CHANNELS

    @property
    def channels_first(self) -> tuple[int, int, int]:
        """One image as the graphs and the wire carry it: (C, H, W)."""
        return (self.channels, self.height, self.width)

    @property
    def channels_last(self) -> tuple[int, ...]:
        """One image as files and arrays hold it: (H, W, C), grey (H, W)."""
        if self.channels == 1:
            return (self.height, self.width)
        return (self.height, self.width, self.channels)

    def images(self, rows: np.ndarray) -> np.ndarray:
        """Rows [N, D] (channels first) as images [N, H, W, C], as files hold them."""
        shaped = np.asarray(rows).reshape(-1, *self.channels_first)
        return shaped.transpose(0, 2, 3, 1)

    def rows(self, array: np.ndarray, field: str = "images") -> np.ndarray:
        """Images as rows [N, D], channels first: from files' and arrays' [N, H, W, C] (or grey
        [N, H, W], [N, H, W, 1]), from the wire's [N, C, H, W], or rows [N, D] as they are. An
        array that could be either [N, H, W, C] or [N, C, H, W] (C = H = W) is read as the wire's."""
        array = np.asarray(array)
        shape = tuple(array.shape[1:])
        if array.ndim == 2 and shape == (self.size,):
            return array
        if shape == self.channels_first or (self.channels == 1 and shape == (self.height, self.width)):
            return array.reshape(len(array), self.size)
        if shape == (self.height, self.width, self.channels):
            return np.ascontiguousarray(array.transpose(0, 3, 1, 2)).reshape(len(array), self.size)
        raise TensorError(
            f"{field}: shape {list(array.shape)}; this model's images are [N, {self.height}, {self.width}, "
            f"{self.channels}] (channels last, as files hold them), [N, {self.channels}, {self.height}, "
            f"{self.width}] (channels first, as the wire carries them) or rows [N, {self.size}]"
        )

    def pictures(self, rows: np.ndarray) -> np.ndarray:
        """Rows as what image libraries draw: [N, H, W, C] in colour, else [N, H, W] (the
        first channel)."""
        images = self.images(rows)
        return images if self.colour else images[..., 0]


def png_pixels(rows: np.ndarray, image_shape: tuple[int, ...]) -> np.ndarray:
    """Rows as PNGs hold them: grey [N, H, W], RGB or RGBA [N, H, W, C], and anything else (flat
    vectors, other channel counts) as one line of grey pixels [N, 1, D]."""
    layout = ImageLayout.of(image_shape)
    if layout is not None and layout.channels == 1:
        return np.asarray(rows).reshape(-1, layout.height, layout.width)
    if layout is not None and layout.colour:
        return layout.images(rows)
    return np.asarray(rows).reshape(len(rows), 1, -1)


def to_rows(array: np.ndarray, image_shape: tuple[int, ...] | None, field: str = "images") -> np.ndarray:
    """[N, ...] as rows [N, D] for a model whose rows are images of ``image_shape`` (see
    ``ImageLayout.rows``); flat-vector models' (and, ``image_shape`` unknown, any) arrays are
    flattened per row."""
    layout = None if image_shape is None else ImageLayout.of(image_shape)
    array = np.asarray(array)
    if layout is None or layout.channels == 1:
        return array.reshape(len(array), -1)
    return layout.rows(array, field)
