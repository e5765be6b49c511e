"""Colour images, [N, H, W, C] channels last in files and arrays, rows channels first, through
every stage that reads rows as images (vaeserve.layout): pictures, the OOD score's PNG bits,
embed's image folders and arrays, and `vae train` on a colour .npz, which used to end in a
traceback drawing its pictures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vaeserve.errors import TensorError
from vaeserve.layout import ImageLayout, png_pixels, to_rows


def colour_images(count: int, height: int = 16, width: int = 12, seed: int = 0) -> np.ndarray:
    """uint8 [N, H, W, 3]: a colour per image, a bright square at a random place."""
    rng = np.random.default_rng(seed)
    images = np.zeros((count, height, width, 3), np.uint8)
    for image in images:
        image[...] = rng.integers(0, 256, 3, dtype=np.uint8)
        top, left = rng.integers(0, height - 4), rng.integers(0, width - 4)
        image[top : top + 4, left : left + 4] = 255
    return images


def test_the_layout_of_rows_as_images() -> None:
    images = colour_images(2)
    layout = ImageLayout.of((16, 12, 3))
    assert layout is not None and layout.colour and layout.size == 16 * 12 * 3
    rows = layout.rows(images)  # channels first: all of the red plane, then green, then blue
    np.testing.assert_array_equal(rows[:, : 16 * 12], images[..., 0].reshape(2, -1))
    np.testing.assert_array_equal(layout.images(rows), images)
    # The wire's [N, C, H, W] and rows read the same; a wrong shape says what is taken.
    np.testing.assert_array_equal(layout.rows(images.transpose(0, 3, 1, 2)), rows)
    np.testing.assert_array_equal(to_rows(rows, (16, 12, 3)), rows)
    with pytest.raises(TensorError, match=r"\[N, 16, 12, 3\] \(channels last.*\[N, 3, 16, 12\]"):
        layout.rows(images[:, :8])
    assert ImageLayout.of((28, 28)).pictures(np.zeros((5, 784))).shape == (5, 28, 28)
    assert ImageLayout.of((784,)) is None
    assert png_pixels(rows, (16, 12, 3)).shape == (2, 16, 12, 3)
    assert png_pixels(np.zeros((5, 784)), (28, 28, 1)).shape == (5, 28, 28)
    assert png_pixels(np.zeros((5, 128)), (8, 8, 2)).shape == (5, 1, 128)


def test_pictures_of_a_colour_model_are_in_colour(tmp_path: Path) -> None:
    from vaeserve.pictures import model_pictures

    rows = ImageLayout.of((16, 12, 3)).rows(colour_images(64)).astype(np.float32) / 255

    def encode(x):
        return x[:, :4].copy(), np.full((len(x), 4), 0.5, np.float32)

    def decoder(z):  # logits whose means are the rows again, whatever z
        probs = np.resize(np.clip(rows, 0.01, 0.99), (len(z), rows.shape[1]))
        return np.log(probs / (1 - probs))

    paths = model_pictures(encode, decoder, rows, None, (16, 12, 3), tmp_path)
    assert {p.name for p in paths} >= {
        "posterior_predictive.png",
        "prior_predictive.png",
        "latent_manifold.png",
    }
    picture = np.asarray(Image.open(tmp_path / "posterior_predictive.png").convert("RGB"), np.int16)
    # Grey pictures have equal channels everywhere; these have colour.
    assert np.abs(picture[..., 0] - picture[..., 1]).max() > 50


def test_embed_reads_colour_image_files_as_colour_rows(tmp_path: Path) -> None:
    from vaeserve.embed.sources import ImageFolderSource

    images = colour_images(3)
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    (chunk,) = ImageFolderSource(tmp_path, (16, 12, 3)).chunks(8)
    np.testing.assert_array_equal(chunk, ImageLayout.of((16, 12, 3)).rows(images))
    (grey,) = ImageFolderSource(tmp_path, (16, 12)).chunks(8)
    assert grey.shape == (3, 16 * 12)


def test_vae_train_on_a_colour_npz_draws_its_pictures(tmp_path: Path) -> None:
    data = tmp_path / "colour.npz"
    np.savez(data, x_train=colour_images(600, seed=1), x_test=colour_images(100, seed=2))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "vaeserve.cli", "train", "--dataset", str(data), "--out", str(out)]
    flags = ["--hidden-sizes", "32", "--latent-size", "4", "--epochs", "1", "--no-progress"]
    done = subprocess.run([*command, *flags], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    drawn = np.asarray(Image.open(out / "plots" / "posterior_predictive.png").convert("RGB"), np.int16)
    assert np.abs(drawn[..., 0] - drawn[..., 2]).max() > 50


def test_image_files_for_a_model_of_other_channel_counts_are_refused(tmp_path: Path) -> None:
    from vaeserve.embed.sources import ImageFolderSource
    from vaeserve.errors import DataError

    Image.fromarray(colour_images(1)[0]).save(tmp_path / "0.png")
    with pytest.raises(DataError, match="images have 2 channels; image files give 1"):
        ImageFolderSource(tmp_path, (16, 12, 2))
