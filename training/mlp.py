"""The seed's architecture: a multilayer perceptron on flat rows. The encoder maps D inputs
through ``--hidden-sizes`` to 2M outputs, the decoder mirrors it, with ``--activation`` between
layers; ``--init seed`` is the TF1 program's W ~ N(0, 1) · 2/√fan_in, b = 0."""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import nn

from vaeserve.training.architectures import Networks
from vaeserve.training.config import TrainConfig

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "softplus": nn.Softplus, "elu": nn.ELU}


def mlp(widths: list[int], activation: str) -> nn.Sequential:
    """Dense layers with ``activation`` between them and none after the last."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(widths) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class Mlp:
    name = "mlp"
    config_keys = ("hidden_sizes", "activation")

    def build(
        self, config: TrainConfig, image_shape: tuple[int, ...], latent_size: int, params: int = 1
    ) -> Networks:
        input_size, hidden = math.prod(image_shape), list(config.hidden_sizes)
        return Networks(
            encoder=mlp([input_size, *hidden, 2 * latent_size], config.activation),
            decoder=mlp([latent_size, *reversed(hidden), params * input_size], config.activation),
        )

    def row_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Flat rows [D]: the graphs take [N, D]."""
        return (math.prod(image_shape),)

    def output_layer(self, networks: Networks) -> nn.Module:
        return networks.decoder[-1]

    def initialise(self, networks: Networks, init: str) -> None:
        if init == "seed":
            networks.encoder.apply(seed_init)
            networks.decoder.apply(seed_init)

    def describe(
        self, config: dict[str, Any], image_shape: tuple[int, ...], latent_size: int, params: int = 1
    ) -> dict[str, Any]:
        hidden, activation = [int(h) for h in config["hidden_sizes"]], config["activation"]
        inward = "-".join(str(h) for h in hidden)
        outward = "-".join(str(h) for h in reversed(hidden))
        d, m = math.prod(image_shape), latent_size
        return {
            "encoder": f"MLP {d}-{inward}-(2x{m}), {activation}: mean, softplus stddev",
            "decoder": f"MLP {m}-{outward}-{d * params}, {activation}: {outputs(params)}",
            "hidden_sizes": hidden,
            "activation": activation,
        }


def outputs(params: int) -> str:
    """What a decoder's last layer gives, in a description."""
    return "logits" if params == 1 else f"the likelihood's {params} parameters per value"


def seed_init(module: nn.Module) -> None:
    """The TF1 program's initialiser, W ~ N(0, 1) · 2/√fan_in and b = 0, on a dense or a
    convolutional layer (fan_in: the inputs of one output, kernel included)."""
    if isinstance(module, nn.Linear | nn.Conv2d):
        fan_in = module.weight[0].numel()
        with torch.no_grad():
            module.weight.normal_(0.0, 2.0 / math.sqrt(fan_in))
            module.bias.zero_()


ARCHITECTURE = Mlp()
