"""`vae import --diffusers DIR`: a latent-diffusion autoencoder saved by diffusers becomes a version.

A folder as ``save_pretrained`` writes it (``config.json`` and the weights) of an
``AutoencoderKL`` (Stable Diffusion 1.x/2.x, SDXL, SD3, FLUX: 4 or 16 latent channels, with or
without a shift factor) or an ``AutoencoderTiny`` (TAESD) is exported as two graphs with dynamic
batch, height and width, checked against diffusers on the same weights, and published into the
model repository as ``vae export`` publishes (built in a staging folder, renamed into place):

- ``encoder.onnx``: images [N, 3, H, W] in [−1, 1] → ``mean`` and ``stddev`` [N, C, H/f, W/f], as
  ``encode(x).latent_dist`` has them (AutoencoderTiny, whose encoder is deterministic: its
  latents and a zero stddev), and for AutoencoderKL ``logvar``, the log-variance before diffusers'
  clamp, which tiled encoding blends (vaeserve.tiling);
- ``decoder.onnx``: latents [N, C, h, w] → ``images`` [N, 3, 8h, 8w], as ``decode(z).sample``.

Latents are the autoencoder's own; the manifest records the scaling and shift factors that a
pipeline applies, the pixel range, the tiling diffusers' ``enable_tiling()`` would use, and the
parity figures. diffusers is needed here only (the ``diffusers`` extra); the service reads the
graphs and the manifest with onnxruntime and numpy.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from vaeserve import __version__
from vaeserve.atomic import disk_full_said, staging_dir
from vaeserve.errors import ExportError, first_line
from vaeserve.export import checks, graphs, variants
from vaeserve.export.exporter import NAME_PATTERN, graph_record, owner, publish, sweep_stale
from vaeserve.manifest import FileRecord, ImportedAutoencoder, Manifest
from vaeserve.repository import ModelVersion, load_version, next_version, sha256_file
from vaeserve.runtime import open_session
from vaeserve.tiling import Tiling

SUPPORTED = ("AutoencoderKL", "AutoencoderTiny")
WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
ENCODER_OUTPUTS = {"AutoencoderKL": ["mean", "stddev", "logvar"], "AutoencoderTiny": ["mean", "stddev"]}
# Graph outputs against diffusers on the same weights, both float32, per value.
PARITY_TOLERANCE = 1e-4
PARITY_SEED = 0
# fp16's figure is recorded, not enforced (diffusers' own fp16 differs from its fp32 as much);
# past this the converted graph is broken rather than rounded, and the variant is refused.
FP16_REFUSAL = 0.1


@dataclass(frozen=True)
class ImportRequest:
    folder: Path
    repo: Path
    name: str
    version: int | None = None
    force: bool = False
    variants: tuple[str, ...] = ()


def read_config(folder: Path) -> dict[str, Any]:
    """The folder's config.json, if it is an autoencoder this importer takes: else one line
    naming what was found."""
    if not folder.is_dir():
        raise ExportError(f"--diffusers {folder}: no such folder")
    path = folder / "config.json"
    found = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "nothing"
    if not path.is_file():
        raise ExportError(
            f"--diffusers {folder}: no config.json (found: {found}); expected a folder that diffusers' "
            "save_pretrained wrote (the vae/ folder of a pipeline)"
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path}: not valid JSON ({exc})") from None
    kind = config.get("_class_name") if isinstance(config, dict) else None
    if kind not in SUPPORTED:
        what = f"a {kind}" if kind else "no _class_name"
        hint = " (a pipeline's folder: pass its vae/ subfolder)" if (folder / "vae").is_dir() else ""
        raise ExportError(
            f"--diffusers {folder}: config.json names {what}; vae import takes {' or '.join(SUPPORTED)}{hint}"
        )
    if not any((folder / name).is_file() for name in WEIGHTS):
        raise ExportError(
            f"--diffusers {folder}: {kind} config but no weights ({' or '.join(WEIGHTS)}; found: {found})"
        )
    return config


def load_autoencoder(folder: Path, kind: str) -> nn.Module:
    """The model as diffusers loads it, float32, on the CPU; nothing fetched from a network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # its advice (install accelerate) is not the user's
    try:
        model = getattr(diffusers, kind).from_pretrained(
            folder, torch_dtype=torch.float32, local_files_only=True, low_cpu_mem_usage=False
        )
    except Exception as exc:  # diffusers raises OSError, ValueError, RuntimeError for broken folders
        raise ExportError(f"--diffusers {folder}: diffusers cannot load it ({first_line(exc)})") from None
    return model.eval()


def describe(model: nn.Module, kind: str, folder: Path) -> ImportedAutoencoder:
    """What the manifest records: the class, config, factors, and the tiling diffusers would use."""
    import diffusers

    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    if kind == "AutoencoderKL":
        sample = config["sample_size"]
        sample = int(sample[0] if isinstance(sample, list | tuple) else sample)
        downscale = 2 ** (len(config["block_out_channels"]) - 1)
        tiling = Tiling(
            "kl", sample, int(model.tile_latent_min_size), float(model.tile_overlap_factor), downscale
        )
        shift = config.get("shift_factor") or 0.0
    else:
        downscale = 2 ** (len(config["encoder_block_out_channels"]) - 1)
        tiling = Tiling(
            "tiny", int(model.tile_sample_min_size), int(model.tile_sample_min_size) // downscale,
            float(model.tile_overlap_factor), downscale,
        )  # fmt: skip
        shift = config.get("shift_factor") or 0.0
    weights = next(folder / name for name in WEIGHTS if (folder / name).is_file())
    return ImportedAutoencoder(
        diffusers_class=kind,
        config=json.loads(json.dumps(config, default=list)),
        latent_channels=int(config["latent_channels"]),
        downscale=downscale,
        scaling_factor=float(config.get("scaling_factor", 1.0)),
        shift_factor=float(shift),
        stochastic=kind == "AutoencoderKL",
        tiling=tiling,
        image_channels=int(config.get("in_channels", 3)),
        source={
            "folder": str(folder.resolve()),
            "weights": {"file": weights.name, "sha256": sha256_file(weights)},
            "diffusers_version": diffusers.__version__,
        },
    )


class KLEncoder(nn.Module):
    """images → mean, stddev of ``encode(x).latent_dist``, and its log-variance before the clamp."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        dist = self.model.encode(images).latent_dist
        return dist.mean, dist.std, torch.chunk(dist.parameters, 2, dim=1)[1]


class TinyEncoder(nn.Module):
    """images → latents (as the mean) and a zero stddev: TAESD's encoder is deterministic."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latents = self.model.encode(images).latents
        return latents, torch.zeros_like(latents)


class Decoder(nn.Module):
    """latents → ``decode(z).sample``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.model.decode(latents).sample


def export_graphs(
    model: nn.Module, record: ImportedAutoencoder, folder: Path, metadata: dict
) -> tuple[Path, Path]:
    """Both graphs, batch, height and width dynamic (images' sides multiples of f)."""
    f, c = record.downscale, record.latent_channels
    batch, height, width = (torch.export.Dim(n, min=1) for n in ("batch", "height", "width"))
    encoder_module = KLEncoder(model) if record.stochastic else TinyEncoder(model)
    encoder, decoder = folder / "encoder.onnx", folder / "decoder.onnx"
    graphs.export_module(
        encoder_module,
        (torch.zeros(2, record.image_channels, 4 * f, 6 * f),),
        (["images"], ENCODER_OUTPUTS[record.diffusers_class]),
        ({0: batch, 2: f * height, 3: f * width},),
        encoder,
        {**metadata, "role": "encoder"},
    )
    graphs.export_module(
        Decoder(model),
        (torch.zeros(2, c, 4, 6),),
        (["latents"], ["images"]),
        ({0: batch, 2: height, 3: width},),
        decoder,
        {**metadata, "role": "decoder"},
    )
    for path in (encoder, decoder):
        checks.check_graph(path)
    return encoder, decoder


def parity_inputs(record: ImportedAutoencoder) -> tuple[np.ndarray, np.ndarray]:
    """Seeded images in [−1, 1] and N(0, 1) latents, not square, at two batch sizes' worth."""
    rng = np.random.default_rng(PARITY_SEED)
    f = record.downscale
    images = rng.uniform(-1, 1, (2, record.image_channels, 8 * f, 12 * f)).astype(np.float32)
    latents = rng.standard_normal((2, record.latent_channels, 8, 12)).astype(np.float32)
    return images, latents


def reference(model: nn.Module, record: ImportedAutoencoder, images: np.ndarray, latents: np.ndarray) -> dict:
    """diffusers' own outputs on the parity inputs."""
    with torch.no_grad():
        x, z = torch.from_numpy(images), torch.from_numpy(latents)
        if record.stochastic:
            dist = model.encode(x).latent_dist
            mean, stddev = dist.mean, dist.std
        else:
            mean = model.encode(x).latents
            stddev = torch.zeros_like(mean)
        decoded = model.decode(z).sample
    return {"mean": mean.numpy(), "stddev": stddev.numpy(), "images": decoded.numpy()}


def differences(
    encoder: Path, decoder: Path, expected: dict, images: np.ndarray, latents: np.ndarray
) -> dict:
    """Largest absolute difference of each output from diffusers', graphs run by onnxruntime."""
    encoding = open_session(encoder, ["CPUExecutionProvider"]).run(["mean", "stddev"], {"images": images})
    (decoded,) = open_session(decoder, ["CPUExecutionProvider"]).run(None, {"latents": latents})
    found = {"mean": encoding[0], "stddev": encoding[1], "images": decoded}
    return {k: float(np.abs(found[k].astype(np.float32) - expected[k]).max()) for k in expected}


def import_autoencoder(request: ImportRequest) -> ModelVersion:
    graphs.check_torch()
    if not NAME_PATTERN.match(request.name):
        raise ExportError(f"model name {request.name!r}: use letters, digits, '.', '_', '-' (max 64)")
    unknown = set(request.variants) - {"fp16"}
    if unknown:
        raise ExportError(f"--variants {sorted(unknown)}: an imported autoencoder has fp16 (the int8 "
                          "quantizer runs convolutions as ConvInteger, slower than fp32)")  # fmt: skip
    config = read_config(request.folder)
    kind = config["_class_name"]
    model_dir = request.repo / request.name
    version = request.version or next_version(model_dir)
    if version < 1:
        raise ExportError(f"--version {version}: versions are positive integers")
    target = model_dir / str(version)
    if target.exists() and not request.force:
        raise ExportError(f"{target} already exists; pass --force to replace it or omit --version")
    model = load_autoencoder(request.folder, kind)
    model_dir.mkdir(parents=True, exist_ok=True)
    sweep_stale(model_dir)
    with disk_full_said(model_dir):
        staging = staging_dir(f".staging-{version}-{owner()}-", model_dir)
        try:
            build_version(model, kind, request, version, staging)
            load_version(staging)
            publish(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return load_version(target)


def build_version(model: nn.Module, kind: str, request: ImportRequest, version: int, folder: Path) -> None:
    record = describe(model, kind, request.folder)
    metadata = {
        "vaeserve_version": __version__,
        "model_name": request.name,
        "model_version": str(version),
        "diffusers_class": kind,
    }
    encoder, decoder = export_graphs(model, record, folder, metadata)
    images, latents = parity_inputs(record)
    expected = reference(model, record, images, latents)
    found = differences(encoder, decoder, expected, images, latents)
    worst = max(found, key=found.get)
    if found[worst] > PARITY_TOLERANCE:
        raise ExportError(
            f"the exported graphs differ from diffusers by {found[worst]:.2e} on {worst} (tolerance "
            f"{PARITY_TOLERANCE:.0e}); nothing was written"
        )
    built = {}
    for variant in request.variants:
        files = {}
        for role, path in (("encoder", encoder), ("decoder", decoder)):
            target = folder / f"{role}.{variant}.onnx"
            variants.build(variant, path, target)
            files[role] = FileRecord(target.name, target.stat().st_size, sha256_file(target)).to_dict()
        change = differences(
            folder / "encoder.fp16.onnx", folder / "decoder.fp16.onnx", expected, images, latents
        )
        if max(change.values()) > FP16_REFUSAL:
            raise ExportError(
                f"the fp16 graphs differ from diffusers by {max(change.values()):.2e}; not built"
            )
        built[variant] = {**files, "max_abs_diff_vs_diffusers_fp32": change}
    manifest = Manifest(
        vaeserve_version=__version__,
        name=request.name,
        version=version,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        input_size=0,  # images of any size the model takes
        latent_size=record.latent_channels,
        image_shape=(),
        likelihood="none",  # a decoder without p(x|z): images out, no Score
        opset=graphs.OPSET,
        exporter=f"torch.onnx dynamo exporter, torch {torch.__version__}, onnx {onnx.__version__}",
        graphs={role: graph_record(path) for role, path in (("encoder", encoder), ("decoder", decoder))},
        parity={
            "reference": f"diffusers {record.source['diffusers_version']} {kind}, float32, same weights",
            "images_shape": list(images.shape),
            "latents_shape": list(latents.shape),
            "tolerance": PARITY_TOLERANCE,
            "max_abs_diff": found,
        },
        architecture={
            "name": kind,
            "row_shape": [record.image_channels, "height", "width"],
            "posterior": (
                "diagonal Gaussian q(z|x) = N(mean, stddev²) over [C, H/f, W/f]"
                if record.stochastic
                else "deterministic: latents as the mean, stddev 0"
            ),
        },
        variants=built,
        autoencoder=record,
    )
    manifest.write(folder)
