"""Model architectures: each one registered part that owns its networks, their initialisation,
its config keys and its description in the manifest.

An architecture builds an encoder, rows ``x`` [N, D] → [N, 2M] (the posterior's mean and its
stddev before the softplus), and a decoder, latents [N, M] → the likelihood's parameters [N, D];
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


@dataclass(frozen=True)
class Networks:
    encoder: nn.Module  # x [N, D] → [N, 2M]: mean, then the stddev before its softplus
    decoder: nn.Module  # z [N, M] → [N, D]: the likelihood's parameters (logits)


class Architecture(Protocol):
    name: str
    # The TrainConfig fields this architecture reads (the manifest records their values).
    config_keys: tuple[str, ...]

    def build(self, config: TrainConfig, image_shape: tuple[int, ...], latent_size: int) -> Networks:
        """The two networks for rows that are images of ``image_shape`` ([H, W] or [H, W, C],
        flattened in that order), with PyTorch's default initialisation."""
        ...

    def initialise(self, networks: Networks, init: str) -> None:
        """Re-initialise the networks as ``--init`` asks (``torch``: leave them)."""
        ...

    def describe(
        self, config: dict[str, Any], image_shape: tuple[int, ...], latent_size: int
    ) -> dict[str, Any]:
        """The manifest's words for the networks: ``encoder`` and ``decoder`` and the values of
        ``config_keys``."""
        ...


def architecture(name: str) -> Architecture:
    if name not in MODULES:
        raise ConfigError(f"architecture {name!r}: expected one of {', '.join(NAMES)}")
    return importlib.import_module(MODULES[name]).ARCHITECTURE
