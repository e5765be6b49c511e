"""MNIST and Fashion-MNIST (and users' own arrays): files, splits and binarization.

Splits follow the literature: train = the first 50,000 rows of the training
file, validation = its last 10,000, test = the 10,000 test images. Other sizes hold out
a sixth of the training rows (at most 10,000) for validation unless told how many.
Images stay uint8 in memory; ``binarize`` turns them into the model's float32 inputs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from vaeserve.download import RemoteFile, default_cache_dir, fetch
from vaeserve.errors import ConfigError, DataError
from vaeserve.idx import read_idx
from vaeserve.layout import to_rows

SPLITS = ("train", "validation", "test", "all-train")
BINARIZATIONS = ("threshold", "dynamic", "none", "dequantize")
MAX_VALIDATION_ROWS = 10_000  # MNIST's: 60,000 training rows → 50,000 + 10,000


@dataclass(frozen=True)
class DatasetSpec:
    """Where a named dataset comes from."""

    name: str
    mirrors: tuple[str, ...]
    train_images: RemoteFile
    train_labels: RemoteFile
    test_images: RemoteFile
    test_labels: RemoteFile

    @property
    def files(self) -> tuple[RemoteFile, ...]:
        return (self.train_images, self.train_labels, self.test_images, self.test_labels)


# SHA-256 of the .gz files exactly as the canonical mirrors serve them.
MNIST = DatasetSpec(
    name="mnist",
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    train_images=RemoteFile(
        "train-images-idx3-ubyte.gz", "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"
    ),
    train_labels=RemoteFile(
        "train-labels-idx1-ubyte.gz", "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"
    ),
    test_images=RemoteFile(
        "t10k-images-idx3-ubyte.gz", "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"
    ),
    test_labels=RemoteFile(
        "t10k-labels-idx1-ubyte.gz", "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"
    ),
)
FASHION_MNIST = DatasetSpec(
    name="fashion-mnist",
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    train_images=RemoteFile(
        "train-images-idx3-ubyte.gz", "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"
    ),
    train_labels=RemoteFile(
        "train-labels-idx1-ubyte.gz", "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"
    ),
    test_images=RemoteFile(
        "t10k-images-idx3-ubyte.gz", "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"
    ),
    test_labels=RemoteFile(
        "t10k-labels-idx1-ubyte.gz", "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"
    ),
)
DATASETS = {spec.name: spec for spec in (MNIST, FASHION_MNIST)}


@dataclass(frozen=True)
class Dataset:
    """A dataset's images as uint8 rows [N, D] (or floats in [0, 1]) and their labels."""

    name: str
    image_shape: tuple[int, ...]
    train_images: np.ndarray
    train_labels: np.ndarray | None
    test_images: np.ndarray
    test_labels: np.ndarray | None
    # Where the rows were read from (an absolute .npz path or IDX folder), None when downloaded;
    # runs record it so that export and evaluation find the same data offline.
    source: str | None = None
    validation_rows: int | None = None  # None: a sixth of the training rows, at most 10,000

    @property
    def input_size(self) -> int:
        return int(np.prod(self.image_shape))

    @property
    def validation_size(self) -> int:
        if self.validation_rows is not None:
            return self.validation_rows
        return max(1, min(MAX_VALIDATION_ROWS, len(self.train_images) // 6))

    def with_validation(self, rows: int | None) -> Dataset:
        return replace(self, validation_rows=rows)

    def with_image_shape(self, shape: tuple[int, ...] | None) -> Dataset:
        """The rows seen as images of ``shape`` (a flat .npz of 64 features as 8×8, say; colour
        rows as they are, channels first: vaeserve.layout)."""
        if shape is None or tuple(shape) == self.image_shape:
            return self
        if int(np.prod(shape)) != self.input_size:
            raise DataError(
                f"{self.name}: --image-shape {' '.join(map(str, shape))} holds {int(np.prod(shape))} "
                f"values; the rows hold {self.input_size}"
            )
        return replace(self, image_shape=tuple(shape))

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray | None]:
        """Images and labels of ``train``, ``validation``, ``test`` or ``all-train``."""
        if name == "test":
            return self.test_images, self.test_labels
        if name == "all-train":
            return self.train_images, self.train_labels
        if name not in ("train", "validation"):
            raise ConfigError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        cut = len(self.train_images) - self.validation_size
        if cut <= 0 or self.validation_size < 1:
            raise DataError(
                f"{self.name}: {len(self.train_images)} training rows leave no training split with "
                f"--validation-rows {self.validation_size}; pass fewer (at least 1), or "
                "--train-split all-train to train on every row without validation"
            )
        part = slice(0, cut) if name == "train" else slice(cut, None)
        labels = None if self.train_labels is None else self.train_labels[part]
        return self.train_images[part], labels

    def split_sizes(self) -> dict[str, int]:
        validation = min(self.validation_size, len(self.train_images))
        return {
            "train": len(self.train_images) - validation,
            "validation": validation,
            "test": len(self.test_images),
        }


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> Dataset:
    """Load a named dataset from ``data_dir``, the cache or a download; or a user's ``.npz``."""
    data_dir = Path(data_dir) if data_dir is not None else None
    cache_dir = Path(cache_dir) if cache_dir is not None else None
    if name.endswith(".npz"):
        return load_npz(Path(name))
    if name == PHOTO_PATCHES:
        return photo_patches()
    if name not in DATASETS:
        raise ConfigError(
            f"unknown dataset {name!r}; expected one of {', '.join([*DATASETS, PHOTO_PATCHES])} or a "
            "path to a .npz"
        )
    spec = DATASETS[name]
    paths = [_locate(spec, f, data_dir, cache_dir, progress) for f in spec.files]
    train_images = read_idx(paths[0], expected_ndim=3)
    train_labels = read_idx(paths[1], expected_ndim=1)
    test_images = read_idx(paths[2], expected_ndim=3)
    test_labels = read_idx(paths[3], expected_ndim=1)
    _check_pairs(paths[0], train_images, paths[1], train_labels)
    _check_pairs(paths[2], test_images, paths[3], test_labels)
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DataError(
            f"{paths[2]}: image shape {test_images.shape[1:]} differs from the training "
            f"images' {train_images.shape[1:]}"
        )
    shape = tuple(int(s) for s in train_images.shape[1:])
    return Dataset(
        name=name,
        image_shape=shape,
        train_images=train_images.reshape(len(train_images), -1),
        train_labels=train_labels,
        test_images=test_images.reshape(len(test_images), -1),
        test_labels=test_labels,
        source=None if data_dir is None else str(data_dir.resolve()),
    )


def _locate(
    spec: DatasetSpec, file: RemoteFile, data_dir: Path | None, cache_dir: Path | None, progress: bool
) -> Path:
    if data_dir is None:
        folder = (cache_dir or default_cache_dir()) / "datasets" / spec.name
        return fetch(file, spec.mirrors, folder, progress)
    for candidate in (data_dir / file.name, data_dir / file.name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    raise DataError(f"{data_dir}: no {file.name} (nor its uncompressed form) for {spec.name}")


def _check_pairs(images_path: Path, images: np.ndarray, labels_path: Path, labels: np.ndarray) -> None:
    if len(images) != len(labels):
        raise DataError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path}")


# Colour data from a real photograph that a package of the lock ships (matplotlib's sample of
# Grace Hopper, 600 × 512 RGB): nothing is downloaded, and every machine builds the same patches.
PHOTO_PATCHES = "photo-patches"
PHOTO_SPLIT_ROW = 400  # training patches from the rows above, test patches from those below


def photo_patches(train: int = 20_000, test: int = 2_000, size: int = 32, seed: int = 0) -> Dataset:
    """uint8 [N, size, size, 3] patches at random places of the photograph, half of them
    mirrored; the training and test patches come from disjoint parts of it."""
    try:
        from matplotlib import cbook
        from PIL import Image
    except ImportError:
        raise DataError(
            f"{PHOTO_PATCHES} is cut from matplotlib's sample photograph: pip install 'vaeserve[train]'"
        ) from None
    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as image:
        photo = np.asarray(image.convert("RGB"))
    rng = np.random.default_rng(seed)

    def cut(region: np.ndarray, count: int) -> np.ndarray:
        tops = rng.integers(0, region.shape[0] - size + 1, count)
        lefts = rng.integers(0, region.shape[1] - size + 1, count)
        patches = np.stack([region[t : t + size, s : s + size] for t, s in zip(tops, lefts)])
        mirrored = rng.random(count) < 0.5
        patches[mirrored] = patches[mirrored, :, ::-1]
        return patches

    shape = (size, size, 3)
    return Dataset(
        name=PHOTO_PATCHES,
        image_shape=shape,
        train_images=to_rows(cut(photo[:PHOTO_SPLIT_ROW], train), shape),
        train_labels=None,
        test_images=to_rows(cut(photo[PHOTO_SPLIT_ROW:], test), shape),
        test_labels=None,
    )


def load_npz(path: Path) -> Dataset:
    """A user's dataset: ``x_train`` and ``x_test`` [N, ...] (uint8 0-255 or floats in [0, 1];
    images [N, H, W] or [N, H, W, C], channels last), optional ``y_train``/``y_test``. Arrays
    stay lazily loaded per key."""
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz archive ({exc})") from None
    missing = {"x_train", "x_test"} - set(archive.files)
    if missing:
        raise DataError(f"{path}: missing arrays {sorted(missing)}; expected x_train and x_test")
    train, test = archive["x_train"], archive["x_test"]
    for key, array in (("x_train", train), ("x_test", test)):
        check_pixels(array, f"{path}[{key}]")
    if train.shape[1:] != test.shape[1:]:
        raise DataError(f"{path}: x_train rows {train.shape[1:]} differ from x_test rows {test.shape[1:]}")
    shape = tuple(int(s) for s in train.shape[1:])
    return Dataset(
        name=str(path),
        image_shape=shape,
        # [N, H, W, C] colour images as rows channels first (vaeserve.layout); others flattened.
        train_images=to_rows(train, shape),
        train_labels=archive["y_train"] if "y_train" in archive.files else None,
        test_images=to_rows(test, shape),
        test_labels=archive["y_test"] if "y_test" in archive.files else None,
        source=str(path.resolve()),
    )


def check_pixels(array: np.ndarray, source: str) -> None:
    """Pixels are uint8 (0-255) or finite floats in [0, 1]."""
    if array.ndim < 2 or len(array) == 0:
        raise DataError(f"{source}: expected rows of pixels [N, ...] with N >= 1, got shape {array.shape}")
    if array.dtype == np.uint8:
        return
    if not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"{source}: dtype {array.dtype} is not uint8 or float")
    if not np.isfinite(array).all():
        raise DataError(f"{source}: contains NaN or infinite pixels")
    if array.min(initial=0.0) < 0.0 or array.max(initial=0.0) > 1.0:
        raise DataError(f"{source}: float pixels must lie in [0, 1]")


def intensities(images: np.ndarray) -> np.ndarray:
    """Pixel intensities in [0, 1] as float32."""
    if images.dtype == np.uint8:
        return images.astype(np.float32) / np.float32(255.0)
    return images.astype(np.float32, copy=False)


def binarize(images: np.ndarray, mode: str, rng: np.random.Generator | None = None) -> np.ndarray:
    """The model's inputs: ``threshold`` (x > 0.5, the seed's), ``dynamic`` (one Bernoulli(x)
    draw from ``rng``), ``none`` (intensities) or ``dequantize`` (8-bit pixel p as (p + u)/256,
    u ~ U(0, 1) from ``rng``; without one, the bin's midpoint (p + 1/2)/256)."""
    if mode == "threshold" and images.dtype == np.uint8:
        return (images > 127).astype(np.float32)  # x/255 > 0.5 exactly when x >= 128: one pass
    x = intensities(images)
    if mode == "threshold":
        return (x > 0.5).astype(np.float32)
    if mode == "dynamic":
        if rng is None:
            raise ValueError("dynamic binarization needs a random generator")
        return (rng.random(x.shape, dtype=np.float32) < x).astype(np.float32)
    if mode == "none":
        return x
    if mode == "dequantize":
        # Uniform dequantization (Theis et al. 2016): a continuous density on it bounds the
        # 8-bit pixels' probability, where exact 0s would let the density grow without end.
        u = np.float32(0.5) if rng is None else rng.random(x.shape, dtype=np.float32)
        return (np.rint(x * np.float32(255.0)) + u) / np.float32(256.0)
    raise ConfigError(f"unknown binarization {mode!r}; expected one of {', '.join(BINARIZATIONS)}")


def model_inputs(pixels: np.ndarray, mode: str) -> np.ndarray:
    """Raw pixels (uint8 0-255) as a trained model expects them at inference: thresholded for
    ``threshold`` models, intensities for ``dynamic`` (the mean of its draws) and ``none``,
    the bins' midpoints for ``dequantize``."""
    return binarize(pixels, mode if mode in ("threshold", "dequantize") else "none")


def encoder_inputs(rows: np.ndarray, mode: str) -> np.ndarray:
    """What the encoder takes from rows that are either raw uint8 pixels (prepared as in
    training, see `model_inputs`) or model inputs already (passed on as float32)."""
    return model_inputs(rows, mode) if rows.dtype == np.uint8 else rows.astype(np.float32, copy=False)


def evaluation_inputs(images: np.ndarray, mode: str, seed: int = 0) -> np.ndarray:
    """A split as evaluated: dynamic binarization uses one fixed-seed draw (the literature's
    protocol), so every evaluation of a model sees the same binary images; dequantized pixels
    are the bins' midpoints, as served."""
    if mode == "dequantize":
        return model_inputs(images, mode)
    return binarize(images, mode, np.random.default_rng(seed))


def evaluation_slice(
    images: np.ndarray, mode: str, seed: int, first: int = 0, limit: int | None = None
) -> np.ndarray:
    """Rows ``first`` … ``first + limit − 1`` of the split as evaluated whole: the draw that
    binarizes them is the whole split's (made row by row, so the rows before them are drawn and
    dropped), so slices of an evaluation add up to it."""
    if not 0 <= first < len(images):
        raise ConfigError(
            f"--offset {first}: expected 0 to {len(images) - 1} (the split has {len(images)} rows)"
        )
    end = len(images) if limit is None else min(len(images), first + limit)
    return evaluation_inputs(images[:end], mode, seed)[first:]


def load_run_data(
    config: dict,
    recorded: str | None = None,
    data_dir: Path | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
    dataset: str | None = None,
) -> Dataset:
    """A run's dataset as its config describes it (validation rows, image shape), read from
    ``data_dir`` when given, else from where the run read it (``recorded``: its absolute .npz
    path or IDX folder), so export and evaluation work offline; else the download cache.
    ``dataset`` names another dataset than the run's, read from ``data_dir`` or the cache."""
    if dataset:
        config, recorded = {**config, "dataset": dataset}, None
    name = config["dataset"]
    if name.endswith(".npz"):
        path = Path(name)
        if recorded and Path(recorded).is_file() and not path.is_file():
            path = Path(recorded)  # a relative path given where the run was started
        dataset = load_npz(path)
    else:
        if data_dir is None and recorded and Path(recorded).is_dir():
            data_dir = Path(recorded)
        dataset = load_dataset(name, data_dir, cache_dir, progress)
    shape = config.get("image_shape")
    return dataset.with_validation(config.get("validation_rows")).with_image_shape(
        None if shape is None else tuple(shape)
    )
