"""A residual convolutional architecture for images of any size and channel count.

The encoder reads a row as the image it is, channels first ([C, H, W], vaeserve.layout), runs a
3×3 convolution to ``--conv-channels[0]`` channels, then per stage ``--conv-blocks`` residual
blocks and a stride-2 convolution to the next stage's channels (halving the size, rounding up),
and maps the last stage to the posterior's 2M numbers with one dense layer.
The decoder mirrors it: a dense layer to the last stage's grid, per stage residual blocks, a
nearest-neighbour upsampling to the stage's exact size and a 3×3 convolution, and a last 3×3
convolution to the likelihood's P parameters of each of the image's C channels (P·C channels),
returned as a row. Rows in, rows out; the exported graphs take and give images [N, C, H, W].

A residual block is x + conv(act(conv(act(x)))) (He et al. 2016's pre-activation form, without
normalisation: a batch statistic would make a row's encoding depend on its neighbours); its last
convolution starts at zero, so that every block starts as the identity whatever the depth.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from vaeserve.errors import ConfigError
from vaeserve.layout import ImageLayout
from vaeserve.training.architectures import Networks
from vaeserve.training.config import TrainConfig
from vaeserve.training.mlp import ACTIVATIONS, outputs, seed_init

# The convolutions' weights are stored channels last (NHWC), so oneDNN runs every convolution of
# a network in that layout: on this project's 2-core AVX-512 machine the conv preset trains 1.09×
# faster and the evaluator decodes 1.68× (docs/benchmarks.md; benchmarks.train_throughput).
# Only strides change: the values, the checkpoints' tensors and the exported graphs are the same.
CHANNELS_LAST = torch.channels_last


def image_layout(image_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(channels, height, width) of rows that are images of ``image_shape`` (vaeserve.layout)."""
    layout = ImageLayout.of(image_shape)
    if layout is None:
        raise ConfigError(
            f"--architecture conv: images of shape {tuple(image_shape)}; expected [H, W] or [H, W, C] "
            "(--image-shape 28 28 for flat rows of 784)"
        )
    return layout.channels, layout.height, layout.width


def _halved(size: int, stages: int) -> list[int]:
    """The size at each stage: each stride-2 convolution halves it, rounding up."""
    sizes = [size]
    for _ in range(stages - 1):
        sizes.append(math.ceil(sizes[-1] / 2))
    return sizes


class Residual(nn.Module):
    def __init__(self, channels: int, activation: str) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            ACTIVATIONS[activation](),
            nn.Conv2d(channels, channels, 3, padding=1),
            ACTIVATIONS[activation](),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


class Encoder(nn.Module):
    def __init__(self, layout: tuple[int, int, int], channels: list[int], blocks: int, latent: int, act: str):
        super().__init__()
        self.layout = layout
        colours, height, width = layout
        layers: list[nn.Module] = [nn.Conv2d(colours, channels[0], 3, padding=1)]
        for stage, width_here in enumerate(channels):
            layers += [Residual(width_here, act) for _ in range(blocks)]
            if stage + 1 < len(channels):
                layers.append(nn.Conv2d(width_here, channels[stage + 1], 3, stride=2, padding=1))
        layers.append(ACTIVATIONS[act]())
        self.features = nn.Sequential(*layers)
        grid = _halved(height, len(channels))[-1] * _halved(width, len(channels))[-1]
        self.head = nn.Linear(channels[-1] * grid, 2 * latent)
        self.to(memory_format=CHANNELS_LAST)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(rows.reshape(-1, *self.layout)).flatten(1))


class Decoder(nn.Module):
    def __init__(
        self,
        layout: tuple[int, int, int],
        channels: list[int],
        blocks: int,
        latent: int,
        act: str,
        params: int,
    ):
        super().__init__()
        self.layout = layout
        colours, height, width = layout
        heights, widths = _halved(height, len(channels)), _halved(width, len(channels))
        self.grid = (channels[-1], heights[-1], widths[-1])
        self.head = nn.Linear(latent, channels[-1] * heights[-1] * widths[-1])
        layers: list[nn.Module] = []
        for stage in reversed(range(len(channels))):
            layers += [Residual(channels[stage], act) for _ in range(blocks)]
            if stage > 0:
                layers += [
                    nn.Upsample(size=(heights[stage - 1], widths[stage - 1]), mode="nearest"),
                    nn.Conv2d(channels[stage], channels[stage - 1], 3, padding=1),
                ]
        # P parameters of each value, as P·C channels: parameter p of channel c is channel p·C + c.
        layers += [ACTIVATIONS[act](), nn.Conv2d(channels[0], params * colours, 3, padding=1)]
        self.features = nn.Sequential(*layers)
        self.to(memory_format=CHANNELS_LAST)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.features(self.head(z).reshape(-1, *self.grid)).flatten(1)


class Conv:
    name = "conv"
    config_keys = ("conv_channels", "conv_blocks", "activation")

    def build(
        self, config: TrainConfig, image_shape: tuple[int, ...], latent_size: int, params: int = 1
    ) -> Networks:
        layout = image_layout(tuple(image_shape))
        channels, blocks, act = list(config.conv_channels), config.conv_blocks, config.activation
        return Networks(
            encoder=Encoder(layout, channels, blocks, latent_size, act),
            decoder=Decoder(layout, channels, blocks, latent_size, act, params),
        )

    def row_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Images channels first, [C, H, W]: the graphs take [N, C, H, W] (vaeserve.layout)."""
        return image_layout(tuple(image_shape))

    def output_layer(self, networks: Networks) -> nn.Module:
        return networks.decoder.features[-1]

    def initialise(self, networks: Networks, init: str) -> None:
        """``seed``: the seed's rule, W ~ N(0, 1) · 2/√fan_in and b = 0, on every dense and
        convolutional layer; ``torch``: PyTorch's defaults. Either way each residual branch's
        last convolution starts at zero."""
        for network in (networks.encoder, networks.decoder):
            if init == "seed":
                network.apply(seed_init)
            for module in network.modules():
                if isinstance(module, Residual):
                    last = module.branch[-1]
                    nn.init.zeros_(last.weight)
                    nn.init.zeros_(last.bias)

    def describe(
        self, config: dict[str, Any], image_shape: tuple[int, ...], latent_size: int, params: int = 1
    ) -> dict[str, Any]:
        colours, height, width = image_layout(tuple(image_shape))
        channels, blocks = [int(c) for c in config["conv_channels"]], int(config["conv_blocks"])
        stages = "-".join(str(c) for c in channels)
        mirrored = "-".join(str(c) for c in reversed(channels))
        activation = config["activation"]
        return {
            "encoder": (
                f"residual conv {colours}x{height}x{width} → channels {stages} ({blocks} blocks per "
                f"stage, stride-2 between), {activation} → dense (2x{latent_size}): mean, softplus stddev"
            ),
            "decoder": (
                f"dense {latent_size} → residual conv channels {mirrored} "
                f"(nearest upsampling between) → {colours * params}x{height}x{width}, {activation}: "
                f"{outputs(params)}"
            ),
            "conv_channels": channels,
            "conv_blocks": blocks,
            "activation": activation,
        }


ARCHITECTURE = Conv()
