import math

import numpy as np
import pytest
import torch

from vaeserve import elbo as np_elbo
from vaeserve.likelihoods import log_bernoulli
from vaeserve.training.config import TrainConfig, resolve_config
from vaeserve.training.model import VAE
from vaeserve.training.objectives import elbo, gaussian_kl, iwae
from vaeserve.training.optim import TF1RMSprop


def mlp_vae(input_size: int, hidden: tuple[int, ...], latent: int) -> VAE:
    """An mlp VAE with PyTorch's default initialisation."""
    return VAE.from_config(TrainConfig(hidden_sizes=hidden, latent_size=latent, init="torch"), (input_size,))


def test_seed_preset_is_the_tf1_architecture() -> None:
    model = VAE.from_config(resolve_config("seed", None, {}), (28, 28))
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [(200, 784), (200,), (200, 200), (200,), (200, 100), (200,), (784, 200), (784,)]
    first = model.encoder[0]
    assert torch.all(first.bias == 0)
    assert abs(first.weight.std().item() - 2 / math.sqrt(784)) < 0.003


def test_architectures_are_registered_parts() -> None:
    """The config names an architecture; the registry builds it, or says which exist."""
    from vaeserve.errors import ConfigError
    from vaeserve.training.architectures import NAMES, architecture

    assert NAMES == ("mlp", "conv") and [architecture(n).name for n in NAMES] == ["mlp", "conv"]
    with pytest.raises(ConfigError, match="architecture 'resnet9000': expected one of mlp, conv"):
        architecture("resnet9000")
    with pytest.raises(ConfigError, match="expected one of mlp, conv"):
        TrainConfig(architecture="resnet9000").validate()
    described = architecture("mlp").describe({"hidden_sizes": [7], "activation": "elu"}, (12,), 3)
    assert described["encoder"] == "MLP 12-7-(2x3), elu: mean, softplus stddev"
    assert described["decoder"] == "MLP 3-7-12, elu: logits"
    several = architecture("mlp").describe({"hidden_sizes": [7], "activation": "elu"}, (12,), 3, params=6)
    assert several["decoder"] == "MLP 3-7-72, elu: the likelihood's 6 parameters per value"


def test_stddev_is_softplus_plus_floor() -> None:
    model = mlp_vae(4, (3,), 2)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    mean, stddev = model.encode(torch.zeros(1, 4))
    assert torch.all(mean == 0)
    torch.testing.assert_close(stddev, torch.full((1, 2), math.log(2) + 1e-6))


def test_tf1_rmsprop_matches_its_update_rule() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = TF1RMSprop([w], lr=0.1, decay=0.9, epsilon=1e-10)
    ms = np.ones(2)
    expected = np.array([1.0, -2.0])
    for grad in ([0.5, -1.0], [2.0, 0.1]):
        w.grad = torch.tensor(grad)
        opt.step()
        ms = 0.9 * ms + 0.1 * np.square(grad)
        expected = expected - 0.1 * np.asarray(grad) / np.sqrt(ms + 1e-10)
    np.testing.assert_allclose(w.detach().numpy(), expected, rtol=1e-6)


def test_elbo_of_fixed_weights_matches_numpy() -> None:
    torch.manual_seed(0)
    model = mlp_vae(12, (7,), 3).eval()
    x = (torch.rand(5, 12) > 0.5).float()
    with torch.no_grad():
        value = elbo(model, x, torch.Generator().manual_seed(3))
        eps = torch.randn((5, 3), generator=torch.Generator().manual_seed(3)).numpy()
        w = [p.numpy().astype(np.float64) for p in model.parameters()]
    hidden = np.maximum(x.numpy() @ w[0].T + w[1], 0) @ w[2].T + w[3]
    mean, stddev = hidden[:, :3], np.logaddexp(0, hidden[:, 3:]) + 1e-6
    z = mean + stddev * eps
    logits = np.maximum(z @ w[4].T + w[5], 0) @ w[6].T + w[7]
    expected = log_bernoulli(x.numpy(), logits) - np_elbo.gaussian_kl(mean, stddev)
    np.testing.assert_allclose(value.numpy(), expected, rtol=1e-5)


def test_analytic_kl_matches_monte_carlo() -> None:
    rng = np.random.default_rng(0)
    mean, stddev = rng.normal(size=(1, 4)), rng.uniform(0.3, 1.5, size=(1, 4))
    z = mean + stddev * rng.standard_normal((400_000, 4))
    monte_carlo = np.mean(np_elbo.log_normal(z, mean, stddev) - np_elbo.log_standard_normal(z))
    assert np_elbo.gaussian_kl(mean, stddev)[0] == pytest.approx(monte_carlo, abs=0.02)
    torch_kl = gaussian_kl(torch.from_numpy(mean), torch.from_numpy(stddev)).item()
    assert torch_kl == pytest.approx(np_elbo.gaussian_kl(mean, stddev)[0], rel=1e-12)


def test_iwae_bound_with_one_sample_is_the_elbo_and_grows_with_k() -> None:
    torch.manual_seed(0)
    model = mlp_vae(20, (16,), 4).eval()
    x = (torch.rand(256, 20) > 0.5).float()
    with torch.no_grad():
        one = iwae(model, x, torch.Generator().manual_seed(1), samples=1)
        same = elbo(model, x, torch.Generator().manual_seed(1))
        many = iwae(model, x, torch.Generator().manual_seed(1), samples=64)
    # One sample: the same estimator up to the MC-vs-analytic KL; on average equal.
    assert abs(one.mean().item() - same.mean().item()) < 0.5
    assert many.mean().item() > one.mean().item()


def test_config_validation_and_round_trip() -> None:
    config = resolve_config("seed", None, {"hidden_sizes": [300, 100], "lr": 0.01})
    assert config.hidden_sizes == (300, 100)
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(Exception, match="optimizer"):
        resolve_config("seed", None, {"optimizer": "sgd"})
    with pytest.raises(Exception, match="unknown config keys"):
        TrainConfig.from_dict({"hiden_sizes": [3]})
