"""`--architecture conv`: a residual convolutional VAE as a registered architecture, really trained
on MNIST, exported and served like the MLP."""

from __future__ import annotations

import math
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


def test_conv_networks_read_and_write_rows_channels_last() -> None:
    """A row is an image [H, W, C] flattened (vaeserve.layout): one bright value at (row 3,
    column 10, channel 1) reaches the first convolution there and only near there, and the
    decoder's last convolution's [N, C, H, W] is the row it returns, channels last."""
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
    with torch.no_grad():
        mean, _ = model.encode(image.reshape(1, -1))
        logits = model.decode(mean)
    (lit,) = torch.nonzero(seen["encoder"][0]).tolist()
    assert lit == [1, 3, 10]  # [C, H, W] inside
    layout = ImageLayout.of(shape)
    expected = seen["decoder"].permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(layout.images(logits.numpy()), expected)


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
    assert described["encoder"].startswith("residual conv 28x28x1")
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
