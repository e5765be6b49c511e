import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest

from vaeserve.datasets import binarize, evaluation_inputs, load_dataset, load_npz
from vaeserve.errors import ConfigError, DataError
from vaeserve.idx import parse_idx, read_idx


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = struct.pack(">HBB", 0, type_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def test_parses_raw_and_gzip_identically(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(idx_bytes(array))
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(array)))
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz", expected_ndim=3), array)


def test_reads_big_endian_wider_types() -> None:
    array = np.array([[1.5, -2.0], [3.25, 4.0]], dtype=np.float32)
    np.testing.assert_array_equal(parse_idx(idx_bytes(array, 0x0D), "f"), array)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b"\x01\x00" + b[2:], "bad IDX magic"),
        (lambda b: b[:2] + b"\x07" + b[3:], "bad IDX magic"),
        (lambda b: b[:-5], "truncated"),
        (lambda b: b + b"\x00", "trailing bytes"),
        (lambda b: b[:6], "truncated IDX header"),
        (lambda b: b[:2], "too short"),
    ],
)
def test_rejects_corrupt_files_naming_them(tmp_path: Path, mutate, message: str) -> None:
    path = tmp_path / "images-idx3-ubyte"
    path.write_bytes(mutate(idx_bytes(np.zeros((3, 4, 4), np.uint8))))
    with pytest.raises(DataError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_rejects_wrong_rank_and_truncated_gzip(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((3, 4), np.uint8))))
    with pytest.raises(DataError, match="rank is 2, expected 3"):
        read_idx(path, expected_ndim=3)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="corrupt or truncated gzip"):
        read_idx(path)


def test_shared_mnist_is_the_original(mnist_dir: Path, mnist) -> None:
    sums = dict(
        line.split()[::-1] for line in (mnist_dir / "SHA256SUMS.uncompressed").read_text().splitlines()
    )
    for name in ("t10k-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        content = gzip.decompress((mnist_dir / f"{name}.gz").read_bytes())
        assert hashlib.sha256(content).hexdigest() == sums[name]
    assert mnist.train_images.shape == (60000, 784) and mnist.test_images.shape == (10000, 784)
    assert mnist.image_shape == (28, 28) and mnist.train_labels.max() == 9
    assert mnist.split_sizes() == {"train": 50000, "validation": 10000, "test": 10000}
    train, _ = mnist.split("train")
    validation, _ = mnist.split("validation")
    np.testing.assert_array_equal(validation[0], mnist.train_images[50000])
    assert len(train) == 50000


def test_missing_and_mismatched_files(tmp_path: Path, mnist_dir: Path) -> None:
    with pytest.raises(DataError, match=r"no train-images-idx3-ubyte\.gz"):
        load_dataset("mnist", data_dir=tmp_path)
    for name in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / name).symlink_to(mnist_dir / name)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(10, np.uint8)))
    with pytest.raises(DataError, match=r"10 labels for 60000 images"):
        load_dataset("mnist", data_dir=tmp_path)
    with pytest.raises(ConfigError, match="unknown dataset"):
        load_dataset("cifar", data_dir=tmp_path)


def test_binarization_modes() -> None:
    images = np.array([[0, 127, 128, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(binarize(images, "threshold"), [[0, 0, 1, 1]])
    np.testing.assert_allclose(binarize(images, "none"), images / 255.0, rtol=1e-6)
    many = np.full((2000, 4), 64, dtype=np.uint8)
    draws = binarize(many, "dynamic", np.random.default_rng(1))
    assert set(np.unique(draws)) <= {0.0, 1.0}
    assert abs(draws.mean() - 64 / 255) < 0.02
    np.testing.assert_array_equal(evaluation_inputs(many, "dynamic"), evaluation_inputs(many, "dynamic"))
    assert not np.array_equal(draws, binarize(many, "dynamic", np.random.default_rng(2)))
    with pytest.raises(ConfigError, match="unknown binarization"):
        binarize(images, "otsu")


def test_users_npz(tmp_path: Path) -> None:
    path = tmp_path / "mine.npz"
    np.savez(path, x_train=np.zeros((20, 5, 5), np.uint8), x_test=np.ones((4, 5, 5), np.float32))
    dataset = load_npz(path)
    assert dataset.image_shape == (5, 5) and dataset.test_images.shape == (4, 25)
    np.savez(path, x_train=np.full((3, 4), 2.0), x_test=np.zeros((3, 4)))
    with pytest.raises(DataError, match=r"must lie in \[0, 1\]"):
        load_npz(path)
    np.savez(path, x_train=np.zeros((3, 4)))
    with pytest.raises(DataError, match="missing arrays"):
        load_npz(path)
