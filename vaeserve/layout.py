"""How an image is laid out, decided here once for every stage that looks at rows as images.

Files and arrays hold images as [H, W] (grey) or [H, W, C] (channels last, as numpy and PIL
have them), and a row is one image flattened in that order: D = H · W · C values. A model's
``image_shape`` (its manifest's) says which. Rows whose shape is neither (a flat [D] vector) are
not images: they have no layout, and pictures of them are not drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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

    def images(self, rows: np.ndarray) -> np.ndarray:
        """Rows [N, D] as images [N, H, W, C]."""
        return np.asarray(rows).reshape(-1, self.height, self.width, self.channels)

    def pictures(self, rows: np.ndarray) -> np.ndarray:
        """Rows as what image libraries draw: [N, H, W, C] in colour, else [N, H, W] (the
        first channel)."""
        images = self.images(rows)
        return images if self.colour else images[..., 0]


def png_shape(image_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of one row as a PNG: grey [H, W], RGB or RGBA [H, W, C], and anything else
    (flat vectors, other channel counts) as one line of grey pixels [1, D]."""
    layout = ImageLayout.of(image_shape)
    if layout is not None and layout.channels == 1:
        return (layout.height, layout.width)
    if layout is not None and layout.colour:
        return (layout.height, layout.width, layout.channels)
    return (1, int(np.prod(image_shape)))
