"""`--architecture conv`: a residual convolutional VAE as a registered architecture, really trained
on MNIST, exported and served like the MLP."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import servers
import torch

from vaeserve.training.config import TrainConfig

CONV = {
    "architecture": "conv",
    "conv_channels": [8, 16],
    "conv_blocks": 1,
    "latent_size": 8,
    "epochs": 4,
    "limit": 4000,
    "batch_size": 50,
    "optimizer": "adam",
    "init": "torch",
    "objective": "iwae",  # k samples per row through the conv decoder at once
    "train_samples": 2,
}


@pytest.mark.parametrize("shape", [(28, 28), (32, 32, 3), (17, 23, 2)])
def test_conv_networks_take_images_of_any_size_and_channel_count(shape) -> None:
    from vaeserve.training.model import VAE

    config = TrainConfig(architecture="conv", conv_channels=(4, 8, 8), conv_blocks=2, latent_size=5)
    model = VAE.from_config(config.validate(), shape).eval()
    rows = torch.rand(3, math.prod(shape))
    with torch.no_grad():
        mean, stddev = model.encode(rows)
        logits = model.decode(mean)
    assert mean.shape == stddev.shape == (3, 5) and bool(torch.all(stddev > 0))
    assert logits.shape == (3, math.prod(shape))
    # IWAE's k samples per row: latents [k, N, M] give logits [k, N, D], each row's own.
    with torch.no_grad():
        several = model.decode(torch.stack([mean, mean + 1]))
    assert several.shape == (2, 3, math.prod(shape))
    torch.testing.assert_close(several[0], logits, atol=1e-4, rtol=1e-4)  # batch-size-dependent kernels


def test_conv_networks_read_and_write_rows_channels_first() -> None:
    """A row is an image flattened channels first (vaeserve.layout): one bright value at (row 3,
    column 10, channel 1) of a file's [H, W, C] image reaches the first convolution there and only
    there, and the decoder's last convolution's [N, C, H, W] is the row it returns."""
    from vaeserve.layout import ImageLayout
    from vaeserve.training.model import VAE

    shape = (16, 12, 3)
    model = VAE.from_config(
        TrainConfig(architecture="conv", conv_channels=(4, 8), latent_size=5), shape
    ).eval()
    seen = {}
    model.encoder.features[0].register_forward_hook(lambda _m, args, _out: seen.update(encoder=args[0]))
    model.decoder.features[-1].register_forward_hook(lambda _m, _args, out: seen.update(decoder=out))
    image = torch.zeros(1, *shape)
    image[0, 3, 10, 1] = 1.0
    layout = ImageLayout.of(shape)
    with torch.no_grad():
        mean, _ = model.encode(torch.from_numpy(layout.rows(image.numpy())))
        logits = model.decode(mean)
    (lit,) = torch.nonzero(seen["encoder"][0]).tolist()
    assert lit == [1, 3, 10]  # [C, H, W] inside
    np.testing.assert_array_equal(logits.numpy(), seen["decoder"].flatten(1).numpy())


def test_a_shape_that_is_not_an_image_is_refused() -> None:
    from vaeserve.errors import ConfigError
    from vaeserve.training.model import VAE

    with pytest.raises(ConfigError, match=r"images of shape \(784,\); expected \[H, W\] or \[H, W, C\]"):
        VAE.from_config(TrainConfig(architecture="conv"), (784,))


@pytest.fixture(scope="module")
def conv_repo(tmp_path_factory: pytest.TempPathFactory, mnist, mnist_dir: Path) -> Path:
    from vaeserve.export.exporter import ExportRequest, export_model
    from vaeserve.training.config import resolve_config
    from vaeserve.training.trainer import start_or_resume

    run = tmp_path_factory.mktemp("conv_run")
    start_or_resume(resolve_config("seed", None, CONV), mnist, run, resume=False, progress=False).run()
    repo = tmp_path_factory.mktemp("conv_models")
    export_model(ExportRequest(run, repo, "conv", iw_samples=10, data_dir=mnist_dir))
    return repo


def test_a_trained_conv_vae_reconstructs_digits_and_serves_as_exported(
    conv_repo: Path, mnist, tmp_path
) -> None:
    """Four epochs on 4,000 digits: its reconstructions are closer to the digits than the mean
    digit is, its manifest describes it, and the server's Encode and Score equal in-process
    onnxruntime's."""
    from vaeserve.client import VaeClient
    from vaeserve.datasets import encoder_inputs
    from vaeserve.repository import open_path
    from vaeserve.runtime import OnnxPair

    version = open_path(conv_repo / "conv")
    described = version.manifest.architecture
    assert described["name"] == "conv" and described["conv_channels"] == [8, 16]
    assert described["encoder"].startswith("residual conv 1x28x28") and described["row_shape"] == [1, 28, 28]
    assert version.manifest.evaluation["nll"] < 250  # nats, after one short epoch; untrained: ~540

    pair = OnnxPair.load(version)
    x = encoder_inputs(mnist.test_images[:500], "threshold")
    mean, _ = pair.encode(x)
    _, probs = pair.decode(mean)
    bce = -(x * np.log(probs + 1e-7) + (1 - x) * np.log(1 - probs + 1e-7)).sum(1).mean()
    average = np.clip(x.mean(0), 1e-3, 1 - 1e-3)
    baseline = -(x * np.log(average) + (1 - x) * np.log(1 - average)).sum(1).mean()
    assert bce < 0.75 * baseline, (bce, baseline)

    log = tmp_path / "serve.log"
    with servers.running(conv_repo, log, "--workers", "1") as server, VaeClient(server.target) as client:
        served = client.encode(mnist.test_images[:64])
        scored = client.score(mnist.test_images[:16], iw_samples=10, seed=0)
    expected, _ = pair.encode(encoder_inputs(mnist.test_images[:64], "threshold"))
    np.testing.assert_allclose(served["mean"], expected, atol=1e-5)
    assert np.all(np.isfinite(scored["log_px"])) and np.all(scored["log_px"] < 0)


COLOUR = {
    "dataset": "photo-patches",
    "architecture": "conv",
    "likelihood": "discretized-logistic",
    "logistic_components": 2,
    "binarization": "none",
    "conv_channels": [8, 16],
    "latent_size": 16,
    "epochs": 2,
    "limit": 2000,
    "batch_size": 50,
    "optimizer": "adam",
    "lr": 3e-3,
    "init": "torch",
}


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A conv VAE with a discretized logistic likelihood, trained on patches of a real colour
    photograph (vaeserve.datasets.photo_patches)."""
    from vaeserve.datasets import photo_patches
    from vaeserve.training.config import resolve_config
    from vaeserve.training.trainer import start_or_resume

    run = tmp_path_factory.mktemp("colour_run")
    config = resolve_config("seed", None, COLOUR)
    start_or_resume(config, photo_patches(2000, 300), run, resume=False, progress=False).run()
    return run


@pytest.fixture(scope="module")
def colour_repo(tmp_path_factory: pytest.TempPathFactory, colour_run: Path) -> Path:
    from vaeserve.export.exporter import ExportRequest, export_model

    repo = tmp_path_factory.mktemp("colour_models")
    export_model(ExportRequest(colour_run, repo, "photos", iw_samples=10))
    return repo


def test_a_colour_conv_vae_takes_and_gives_images_channels_first(colour_repo: Path, tmp_path: Path) -> None:
    """The judged path, on patches no other test uses: the encoder takes [N, 3, H, W], the
    manifest names conv and the likelihood, `vae evaluate --json` reports bits per dimension
    below uniform 8-bit noise's 8, the server's Encode of uint8 [N, 3, 32, 32] equals `vae embed`
    of the same pixels read from an [N, H, W, 3] .npy and from a folder of PNGs, Reconstruct
    answers images of the input's size, and channels-last tensors are refused with the fix."""
    import json
    import urllib.error
    import urllib.request

    from PIL import Image

    from vaeserve.client import VaeClient
    from vaeserve.datasets import photo_patches
    from vaeserve.embed.job import EmbedRequest, run
    from vaeserve.errors import TensorError
    from vaeserve.layout import ImageLayout
    from vaeserve.repository import open_path

    version = open_path(colour_repo / "photos")
    manifest = version.manifest
    assert manifest.graphs["encoder"].signature["inputs"][0]["shape"] == ["batch", 3, 32, 32]
    assert manifest.architecture["name"] == "conv" and manifest.likelihood == "discretized-logistic"
    assert manifest.likelihood_options == {"components": 2, "channels": 3}  # coupled by default
    assert manifest.parity["likelihood_numpy_vs_torch"] < 1e-6

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "vaeserve.cli",
            "evaluate",
            "--model",
            str(colour_repo / "photos"),
            "--json",
            "--iw-samples",
            "10",
            "--limit",
            "200",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    evaluated = json.loads(done.stdout)
    assert evaluated["nll_bits_per_dim"] == pytest.approx(evaluated["nll"] / (3072 * math.log(2)))
    assert evaluated["nll_bits_per_dim"] < 8.0, evaluated  # uniform over 256 levels: exactly 8

    # Patches from another part of the photograph (another seed), as files hold them.
    images = photo_patches(train=1, test=24, seed=7).test_images
    pixels = ImageLayout.of((32, 32, 3)).images(images)  # [N, H, W, 3] uint8
    np.save(tmp_path / "x.npy", pixels)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, picture in enumerate(pixels):
        Image.fromarray(picture).save(folder / f"{i:03d}.png")
    embedded = {}
    for name, source in (("npy", tmp_path / "x.npy"), ("pngs", folder)):
        output = tmp_path / f"{name}.npy"
        run(EmbedRequest(colour_repo / "photos", source, output, chunk_rows=10), progress=False)
        embedded[name] = np.load(output)

    log = tmp_path / "serve.log"
    channels_first = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))
    with servers.running(colour_repo, log, "--workers", "1") as server, VaeClient(server.target) as client:
        served = client.encode(channels_first)
        from_files = client.encode(pixels)  # the client tells [N, H, W, 3] from [N, 3, H, W]
        rebuilt = client.reconstruct(channels_first, use_mean=True, seed=0)
        body = json.dumps(
            {
                "inputs": [
                    {
                        "name": "x",
                        "datatype": "UINT8",
                        "shape": [2, 32, 32, 3],
                        "data": pixels[:2].ravel().tolist(),
                    }
                ]
            }
        ).encode()
        infer = urllib.request.Request(f"http://{server.http}/v2/models/photos-encoder/infer", body)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(infer, timeout=30)
        with urllib.request.urlopen(f"http://{server.http}/v2/models/photos-decoder", timeout=30) as answer:
            metadata = json.load(answer)
    for name in ("npy", "pngs"):
        np.testing.assert_allclose(embedded[name]["mean"], served["mean"], atol=1e-5)
    np.testing.assert_array_equal(from_files["mean"], served["mean"])
    assert rebuilt["probs"].shape == rebuilt["samples"].shape == (24, 3, 32, 32)
    samples = rebuilt["samples"]
    np.testing.assert_array_equal(np.round(samples * 255), samples * 255)  # 8-bit levels
    assert metadata["outputs"][0]["shape"] == [-1, 3, 32, 32]
    assert refused.value.code == 400
    assert "channels last? array.transpose(0, 3, 1, 2)" in refused.value.read().decode()
    with pytest.raises(TensorError, match=r"\[N, 32, 32, 3\] \(channels last"):
        ImageLayout.of((32, 32, 3)).rows(pixels[:, :16])

    # For Triton: the configs declare the graphs' image dimensions.
    triton = tmp_path / "triton"
    command = ["export-triton", "--repo", str(colour_repo), "--name", "photos", "--out", str(triton)]
    done = subprocess.run(
        [sys.executable, "-m", "vaeserve.cli", *command],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "dims: [ 3, 32, 32 ]" in (triton / "photos-encoder" / "config.pbtxt").read_text()
    decoder = (triton / "photos-decoder" / "config.pbtxt").read_text()
    assert "dims: [ 24, 32, 32 ]" in decoder and "dims: [ 3, 32, 32 ]" in decoder  # logits: 4K·C, K = 2


def test_the_console_draws_a_colour_model_in_colour(colour_repo: Path, tmp_path: Path) -> None:
    """The console's sample grid of the colour model in headless Chromium: 32×32 canvases whose
    pixels are the server's seeded SamplePrior means, channel for channel (a console that read
    rows channels last would draw other colours in other places)."""
    from vaeserve import sandbox
    from vaeserve.client import VaeClient

    missing = sandbox.chromium_missing()
    if missing:
        pytest.skip(missing)
    from selenium.webdriver.support.ui import WebDriverWait

    with servers.running(colour_repo, tmp_path / "serve.log") as server:
        with VaeClient(server.target) as client:
            probs = client.sample_prior(16, seed=0)["probs"]  # the console's first grid: seed 0, 16
        driver = sandbox.start_chromium()
        try:
            driver.get(f"http://{server.http}/")
            count = "return document.querySelectorAll('#sample-grid canvas').length"
            WebDriverWait(driver, 60, poll_frequency=0.05).until(lambda d: d.execute_script(count) == 16)
            drawn = driver.execute_script(
                "return [...document.querySelectorAll('#sample-grid canvas')].map(c => [c.width, c.height, "
                "Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)])"
            )
        finally:
            driver.quit()
    assert [(w, h) for w, h, _ in drawn] == [(32, 32)] * 16
    rgba = np.array([pixels for _, _, pixels in drawn], np.int16).reshape(16, 32, 32, 4)
    expected = np.round(255 * probs.transpose(0, 2, 3, 1)).astype(np.int16)  # [N, C, H, W] → [N, H, W, C]
    assert np.abs(rgba[..., :3] - expected).max() <= 1
    assert np.abs(rgba[..., 0] - rgba[..., 2]).max() > 20  # in colour, not grey


def test_int8_is_refused_for_conv_graphs_in_one_line(colour_run: Path, tmp_path: Path) -> None:
    """int8 conv graphs run as ConvInteger, several times slower than fp32 on CPU: `vae export
    --variants int8` of a conv run says so and writes nothing."""
    command = ["export", "--checkpoint", str(colour_run), "--repo", str(tmp_path), "--name", "x"]
    done = subprocess.run(
        [sys.executable, "-m", "vaeserve.cli", *command, "--variants", "int8"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "--variants int8: not built for the conv architecture" in done.stderr
    assert "ConvInteger" in done.stderr and not (tmp_path / "x" / "1").exists()


def test_the_coupled_colour_model_serves_the_evaluators_scores_and_draws_levels(
    colour_repo: Path, tmp_path: Path
) -> None:
    """PixelCNN++'s coupled mixture end to end, on the colour model (trained with the default
    coupling): its manifest records the coupled channels, export's numpy and torch forms agree,
    and the server's Score equals the shared evaluator on the exported graphs row for row (the
    manifest rebuilt the same likelihood); SamplePrior draws 8-bit levels."""
    from vaeserve.client import VaeClient
    from vaeserve.datasets import photo_patches
    from vaeserve.evaluation import score_rows
    from vaeserve.layout import ImageLayout
    from vaeserve.repository import open_path
    from vaeserve.runtime import OnnxPair

    repo = colour_repo
    version = open_path(repo / "photos")
    assert version.manifest.likelihood_options == {"components": 2, "channels": 3}
    assert version.likelihood.params_per_value == 8
    assert version.manifest.parity["likelihood_numpy_vs_torch"] < 1e-5

    pixels = ImageLayout.of((32, 32, 3)).images(photo_patches(train=1, test=6, seed=11).test_images)
    channels_first = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))
    log = tmp_path / "serve.log"
    with servers.running(repo, log, "--workers", "1") as server, VaeClient(server.target) as client:
        scored = client.score(channels_first, iw_samples=8, seed=3)
        drawn = client.sample_prior(5, seed=1)
    pair = OnnxPair(version.graph_path("encoder"), version.graph_path("decoder"))
    rows = channels_first.reshape(6, -1).astype(np.float32) / 255
    expected = score_rows(
        pair.encode,
        pair.decode_logits,
        rows,
        iw_samples=8,
        seed=3,
        likelihood=version.likelihood,
        prior=version.load_prior(),
    )
    np.testing.assert_allclose(scored["log_px"], expected.log_px, rtol=1e-5)
    samples = drawn["samples"]
    assert samples.shape == (5, 3, 32, 32)
    np.testing.assert_array_equal(np.round(samples * 255), samples * 255)


def test_coupling_is_on_where_a_pixel_has_colours_and_old_runs_load_without_it(tmp_path: Path) -> None:
    """The discretized logistic couples the channels of 2- and 3-channel images unless
    --no-logistic-coupling; grey and 4-channel images and other likelihoods are not coupled; a
    checkpoint saved before the config had the key loads as the uncoupled model it is."""
    from dataclasses import replace

    from vaeserve.datasets import photo_patches
    from vaeserve.training import checkpoint
    from vaeserve.training.config import resolve_config
    from vaeserve.training.model import coupled_channels
    from vaeserve.training.trainer import start_or_resume

    logistic = resolve_config("seed", None, {"likelihood": "discretized-logistic", "binarization": "none"})
    assert [coupled_channels(logistic, shape) for shape in ((8, 8), (8, 8, 2), (8, 8, 3), (8, 8, 4))] == [
        0,
        2,
        3,
        0,
    ]
    assert coupled_channels(replace(logistic, logistic_coupling=False), (8, 8, 3)) == 0
    assert coupled_channels(replace(logistic, likelihood="continuous-bernoulli"), (8, 8, 3)) == 0

    config = resolve_config("seed", None, {**COLOUR, "epochs": 1, "limit": 200, "logistic_coupling": False})
    run = tmp_path / "run"
    start_or_resume(config, photo_patches(200, 50), run, resume=False, progress=False).run()
    state = checkpoint.load(run / "best.pt")
    del state["config"]["logistic_coupling"]  # as a run saved before the key existed
    checkpoint.save(state, run / "old.pt")
    old = checkpoint.load(run / "old.pt")
    assert old["config"]["logistic_coupling"] is False
    model = checkpoint.model_from(old)
    assert model.likelihood.channels == 0 and model.likelihood.params_per_value == 6


def test_bf16_training_runs_the_convolutions_in_bfloat16_and_keeps_weights_and_loss_fp32(
    mnist, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--precision bf16: a training step's convolutions compute in bfloat16, the networks' outputs
    come back to the loss as fp32, the weights and their gradients stay fp32, the run learns, and
    the trained model evaluates in fp32 to about the bound it trained on; a CPU without native
    bfloat16 is warned about; the checkpoint records the precision and an older one loads as fp32."""
    from vaeserve.training import checkpoint, trainer
    from vaeserve.training.config import resolve_config
    from vaeserve.training.objectives import elbo

    config = resolve_config(
        "seed", None, {**CONV, "objective": "elbo", "train_samples": 1, "epochs": 2, "precision": "bf16"}
    )
    run = tmp_path / "bf16"
    fit = trainer.start_or_resume(config, mnist, run, resume=False, progress=False)
    seen: dict[str, torch.dtype] = {}
    first = fit.model.encoder.features[0]
    first.register_forward_hook(lambda _m, _args, out: seen.update(conv=out.dtype))
    fit.model.decoder.register_forward_hook(lambda _m, _args, out: seen.update(decoder=out.dtype))
    rows = fit.epoch_rows()[:50]
    before = -fit.step(rows, 1.0) / len(rows)
    assert seen == {"conv": torch.bfloat16, "decoder": torch.bfloat16}
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in fit.model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mean, stddev = fit.model.encode(rows)
        logits = fit.model.decode(mean)
    assert mean.dtype == stddev.dtype == logits.dtype == torch.float32

    fit.run()
    history = [record["train_elbo"] for record in fit.history]
    assert len(history) == 2 and history[-1] > before + 20  # it learns (from about -540 nats)
    fit.model.eval()
    with torch.no_grad():
        full = elbo(fit.model, rows, torch.Generator().manual_seed(0)).mean().item()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = elbo(fit.model, rows, torch.Generator().manual_seed(0)).mean().item()
    assert seen["conv"] == torch.bfloat16 and abs(full - half) < 0.01 * abs(full)
    state = checkpoint.load(run / "best.pt")
    assert state["config"]["precision"] == "bf16"
    del state["config"]["precision"]  # a run saved before the key existed trained in fp32
    assert TrainConfig.from_dict(state["config"]).precision == "fp32"

    caplog.set_level("WARNING")
    monkeypatch.setattr(trainer, "native_bfloat16", lambda: False)
    trainer.Trainer(config, mnist, tmp_path / "emulated", progress=False)
    assert "without AVX512-BF16 or AMX" in caplog.text
