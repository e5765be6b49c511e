"""Small latent-diffusion autoencoders for tests: diffusers' AutoencoderKL (four blocks, scaling and
shift factors) and AutoencoderTiny with seeded random weights, saved by save_pretrained, as a
user's folder would be (no weights exist to download here, and none are needed: the graphs'
arithmetic is the same)."""

from __future__ import annotations

from pathlib import Path

# Four blocks, f = 8, 4 latent channels, a mid-block with attention: Stable Diffusion's layout at
# a width a CI machine trains nothing with in seconds; sample_size 64 makes its tiles 64 pixels
# (8 latents), so a 20-latent side is tiled as diffusers tiles a 2048-pixel SD image.
KL_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=64,
    scaling_factor=0.3611,
    shift_factor=0.1159,
)
TINY_CONFIG = dict(
    encoder_block_out_channels=(16, 16, 16, 16),
    decoder_block_out_channels=(16, 16, 16, 16),
    num_encoder_blocks=(1, 1, 1, 1),
    num_decoder_blocks=(1, 1, 1, 1),
    latent_channels=4,
)


def save_kl(folder: Path, seed: int = 0, **overrides) -> Path:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model = AutoencoderKL(**{**KL_CONFIG, **overrides})
    _perturb(model, seed)
    model.save_pretrained(folder)
    return folder


def save_tiny(folder: Path, seed: int = 0, **overrides) -> Path:
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    model = AutoencoderTiny(**{**TINY_CONFIG, **overrides})
    model.save_pretrained(folder)
    return folder


def _perturb(model, seed: int) -> None:
    """Random weights where diffusers starts some at zero or one (norms' affine terms): a
    mistake in the exported graph's use of them then shows in the outputs."""
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
