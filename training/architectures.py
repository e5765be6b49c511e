"""Model architectures: each one registered part that owns its networks, their initialisation,
its config keys and its description in the manifest.

An architecture builds an encoder, rows ``x`` [N, D] → [N, 2M] (the posterior's mean and its
stddev before the softplus), and a decoder, latents [N, M] → the likelihood's P parameters of
each value [N, P·D] (vaeserve.likelihoods), and says the shape its graphs take a row in ([D]
flat, or an image [C, H, W]);
``training.model.VAE`` does the rest the same way for all of them (posterior, priors, objectives,
export). Adding one is a module beside ``mlp`` and ``conv`` that defines ``ARCHITECTURE``, a line in
``MODULES`` and its tests. This module imports no torch: the command line lists the names.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from vaeserve.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from vaeserve.training.config import TrainConfig

# Each architecture's module, imported when it is asked for.
MODULES = {"mlp": "vaeserve.training.mlp", "conv": "vaeserve.training.conv"}
NAMES = tuple(MODULES)
# What an architecture changes in a preset made for another (the presets are the MLP's), unless
# the config file or a flag sets it: the seed's TF1 RMSProp and N(0, 1)·2/√fan_in initialiser
# diverge on deep residual convolutions (a first epoch's ELBO of −59,000 nats on 32×32 colour
# photographs, 8.3 bits per value after three), Adam from PyTorch's initialisation does not.
DEFAULTS: dict[str, dict[str, Any]] = {
    "conv": {"optimizer": "adam", "init": "torch", "lr": 2e-3, "latent_size": 32},
}


@dataclass(frozen=True)
class Networks:
    encoder: nn.Module  # x [N, D] → [N, 2M]: mean, then the stddev before its softplus
    decoder: nn.Module  # z [N, M] → [N, P·D]: the likelihood's parameters (logits)


class Architecture(Protocol):
    name: str
    # The TrainConfig fields this architecture reads (the manifest records their values).
    config_keys: tuple[str, ...]

    def build(
        self, config: TrainConfig, image_shape: tuple[int, ...], latent_size: int, params: int = 1
    ) -> Networks:
        """The two networks for rows that are images of ``image_shape`` (rows flattened channels
        first, vaeserve.layout), the decoder giving ``params`` numbers per value, with PyTorch's
        default initialisation."""
        ...

    def row_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        """One row as the exported graphs and the wire carry it: [D], or [C, H, W]."""
        ...

    def initialise(self, networks: Networks, init: str) -> None:
        """Re-initialise the networks as ``--init`` asks (``torch``: leave them)."""
        ...

    def output_layer(self, networks: Networks) -> nn.Module:
        """The decoder's last layer (its bias starts at the likelihood's initial parameters)."""
        ...

    def describe(
        self, config: dict[str, Any], image_shape: tuple[int, ...], latent_size: int, params: int = 1
    ) -> dict[str, Any]:
        """The manifest's words for the networks: ``encoder`` and ``decoder`` and the values of
        ``config_keys``."""
        ...


def architecture(name: str) -> Architecture:
    if name not in MODULES:
        raise ConfigError(f"architecture {name!r}: expected one of {', '.join(NAMES)}")
    return importlib.import_module(MODULES[name]).ARCHITECTURE
