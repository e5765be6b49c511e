"""Latent-diffusion autoencoders (issue 39): `vae import --diffusers` of an AutoencoderKL (four
blocks, scaling and shift factors) and an AutoencoderTiny saved by save_pretrained with seeded
random weights, checked against diffusers itself on the same weights: the graphs at sizes the
export never saw, and tiled encoding and decoding against diffusers' enable_tiling()."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")

from autoencoders import KL_CONFIG, save_kl, save_tiny

from vaeserve.repository import resolve
from vaeserve.runtime import open_session

CPU = ["CPUExecutionProvider"]


def vae(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vaeserve.cli", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="session")
def autoencoders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("diffusers")
    return {"kl": save_kl(root / "kl"), "tiny": save_tiny(root / "tiny")}


@pytest.fixture(scope="session")
def latent_repo(tmp_path_factory: pytest.TempPathFactory, autoencoders: dict[str, Path]) -> Path:
    """Both imported by the real command, the KL one with its fp16 variant."""
    repo = tmp_path_factory.mktemp("latent_models")
    for name, extra in (("kl", ["--variants", "fp16"]), ("tiny", [])):
        result = vae(
            "import", "--diffusers", str(autoencoders[name]), "--repo", str(repo), "--name", name, *extra
        )
        assert result.returncode == 0, result.stderr
        assert f"imported {repo / name / '1'}" in result.stdout
    return repo


def diffusers_model(folder: Path):
    import diffusers

    kind = json.loads((folder / "config.json").read_text())["_class_name"]
    return getattr(diffusers, kind).from_pretrained(folder, low_cpu_mem_usage=False).eval()


def test_manifest_records_the_autoencoder(latent_repo: Path, autoencoders: dict[str, Path]) -> None:
    kl = resolve(latent_repo, "kl").manifest
    record = kl.autoencoder
    assert record.diffusers_class == "AutoencoderKL" and record.stochastic
    assert (record.scaling_factor, record.shift_factor) == (
        KL_CONFIG["scaling_factor"],
        KL_CONFIG["shift_factor"],
    )
    assert (record.latent_channels, record.downscale, record.pixel_range) == (4, 8, (-1.0, 1.0))
    assert record.tiling.to_dict() == {
        "style": "kl", "sample_tile": 64, "latent_tile": 8, "overlap": 0.25, "downscale": 8
    }  # fmt: skip
    assert record.config["block_out_channels"] == list(KL_CONFIG["block_out_channels"])
    assert max(kl.parity["max_abs_diff"].values()) < 1e-4
    fp16 = kl.variants["fp16"]["max_abs_diff_vs_diffusers_fp32"]
    assert 0 < max(fp16.values()) < 0.1  # recorded: float16 rounds, and is not broken
    tiny = resolve(latent_repo, "tiny").manifest.autoencoder
    assert tiny.diffusers_class == "AutoencoderTiny" and not tiny.stochastic
    assert tiny.tiling.style == "tiny" and tiny.shift_factor == 0.0
    signature = resolve(latent_repo, "kl").manifest.graphs["encoder"].signature
    assert signature["inputs"][0]["shape"][1] == 3 and all(
        isinstance(d, str) for i in (0, 2, 3) for d in [signature["inputs"][0]["shape"][i]]
    )  # batch, height and width dynamic


@pytest.mark.parametrize("name", ["kl", "tiny"])
def test_graphs_equal_diffusers_at_new_sizes(
    latent_repo: Path, autoencoders: dict[str, Path], name: str
) -> None:
    import torch

    model = diffusers_model(autoencoders[name])
    version = resolve(latent_repo, name)
    encoder = open_session(version.graph_path("encoder"), CPU)
    decoder = open_session(version.graph_path("decoder"), CPU)
    rng = np.random.default_rng(7)
    images = rng.uniform(-1, 1, (3, 3, 48, 80)).astype(np.float32)
    latents = rng.standard_normal((1, 4, 5, 9)).astype(np.float32)
    mean, stddev = encoder.run(["mean", "stddev"], {"images": images})
    (decoded,) = decoder.run(None, {"latents": latents})
    with torch.no_grad():
        if name == "kl":
            dist = model.encode(torch.from_numpy(images)).latent_dist
            expected_mean, expected_stddev = dist.mean.numpy(), dist.std.numpy()
        else:
            expected_mean = model.encode(torch.from_numpy(images)).latents.numpy()
            expected_stddev = np.zeros_like(expected_mean)
        expected_images = model.decode(torch.from_numpy(latents)).sample.numpy()
    assert mean.shape == (3, 4, 6, 10) and decoded.shape == (1, 3, 40, 72)
    np.testing.assert_allclose(mean, expected_mean, atol=1e-4, rtol=0)
    np.testing.assert_allclose(stddev, expected_stddev, atol=1e-4, rtol=0)
    np.testing.assert_allclose(decoded, expected_images, atol=1e-4, rtol=0)
    assert np.abs(decoded).max() > 0.01 and np.abs(mean).std() > 0.01  # not a degenerate model


def test_tiled_kl_equals_diffusers_enable_tiling(latent_repo: Path, autoencoders: dict[str, Path]) -> None:
    """Latents 20×28 against tiles of 8 latents (SD's 2048-pixel decode against 64-latent tiles,
    scaled down): 3×4 tiles overlapping, blended, cropped."""
    import torch

    model = diffusers_model(autoencoders["kl"])
    model.enable_tiling()
    version = resolve(latent_repo, "kl")
    tiling = version.manifest.autoencoder.tiling
    encoder = open_session(version.graph_path("encoder"), CPU)
    decoder = open_session(version.graph_path("decoder"), CPU)
    rng = np.random.default_rng(3)
    latents = rng.standard_normal((2, 4, 20, 28)).astype(np.float32)
    assert tiling.decodes_tiled(20, 28)
    (decoded,) = tiling.decode(lambda z: decoder.run(None, {"latents": np.ascontiguousarray(z)}), latents)
    images = rng.uniform(-1, 1, (1, 3, 160, 224)).astype(np.float32)
    mean, logvar = tiling.encode(
        lambda x: tuple(encoder.run(["mean", "logvar"], {"images": np.ascontiguousarray(x)})), images
    )
    with torch.no_grad():
        expected = model.decode(torch.from_numpy(latents)).sample.numpy()
        dist = model.encode(torch.from_numpy(images)).latent_dist
    assert decoded.shape == expected.shape == (2, 3, 160, 224)
    np.testing.assert_allclose(decoded, expected, atol=1e-3, rtol=0)
    np.testing.assert_allclose(mean, dist.mean.numpy(), atol=1e-3, rtol=0)
    np.testing.assert_allclose(np.exp(0.5 * np.clip(logvar, -30, 20)), dist.std.numpy(), atol=1e-3, rtol=0)
    (untiled,) = decoder.run(None, {"latents": latents})
    assert np.abs(untiled - decoded).max() > 1e-3  # the tiles really were blended, not one run


def test_tiled_tiny_equals_diffusers_enable_tiling(latent_repo: Path, autoencoders: dict[str, Path]) -> None:
    import torch

    model = diffusers_model(autoencoders["tiny"])
    model.enable_tiling()
    model.tile_sample_min_size, model.tile_latent_min_size = 128, 16
    version = resolve(latent_repo, "tiny")
    tiling = version.manifest.autoencoder.tiling.with_sample_tile(128)
    encoder = open_session(version.graph_path("encoder"), CPU)
    decoder = open_session(version.graph_path("decoder"), CPU)
    rng = np.random.default_rng(4)
    latents = rng.standard_normal((1, 4, 20, 28)).astype(np.float32)
    images = rng.uniform(-1, 1, (1, 3, 160, 224)).astype(np.float32)
    (decoded,) = tiling.decode(lambda z: decoder.run(None, {"latents": np.ascontiguousarray(z)}), latents)
    mean, stddev = tiling.encode(
        lambda x: tuple(encoder.run(None, {"images": np.ascontiguousarray(x)})), images
    )
    with torch.no_grad():
        expected = model.decode(torch.from_numpy(latents)).sample.numpy()
        expected_latents = model.encode(torch.from_numpy(images)).latents.numpy()
    np.testing.assert_allclose(decoded, expected, atol=1e-3, rtol=0)
    np.testing.assert_allclose(mean, expected_latents, atol=1e-3, rtol=0)
    assert not stddev.any()


def test_tile_sizes_are_checked() -> None:
    from vaeserve.errors import TensorError
    from vaeserve.tiling import Tiling

    tiling = Tiling("kl", 512, 64, 0.25, 8)
    assert tiling.with_sample_tile(256).latent_tile == 32
    with pytest.raises(TensorError, match="multiple of 8"):
        tiling.with_sample_tile(100)


def test_import_refuses_what_it_cannot_take(tmp_path: Path, autoencoders: dict[str, Path]) -> None:
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    pipeline = tmp_path / "pipeline"
    (pipeline / "vae").mkdir(parents=True)
    (pipeline / "model_index.json").write_text("{}")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((autoencoders["kl"] / "config.json").read_text())
    cases = [
        (
            unet,
            [],
            "config.json names a UNet2DConditionModel; vae import takes AutoencoderKL or AutoencoderTiny",
        ),
        (pipeline, [], "no config.json (found: model_index.json, vae)"),
        (bare, [], "AutoencoderKL config but no weights"),
        (autoencoders["kl"], ["--variants", "int8"], "an imported autoencoder has fp16"),
        (autoencoders["kl"], ["--name", "bad/name"], "model name 'bad/name'"),
    ]
    for folder, extra, fragment in cases:
        args = ["import", "--diffusers", str(folder), "--repo", str(tmp_path / "repo")]
        result = vae(*args, *(extra if "--name" in extra else ["--name", "m", *extra]))
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert not (tmp_path / "repo" / "m").exists() or not any((tmp_path / "repo" / "m").iterdir())
