"""`vae export` and `vae evaluate --model` (the latter needs numpy and onnxruntime only)."""

from __future__ import annotations

import argparse
from pathlib import Path

from vaeserve.errors import ConfigError, require


def register(subparsers: argparse._SubParsersAction) -> None:
    from vaeserve.training.cli import add_data_flags

    parser = subparsers.add_parser(
        "export",
        help="write a checkpoint as encoder/decoder ONNX graphs into a model repository",
        description="Export a checkpoint to REPO/NAME/VERSION/{encoder.onnx, decoder.onnx, "
        "manifest.json}. The version appears atomically, only after every check passed.",
    )
    parser.add_argument(
        "--checkpoint", type=Path, required=True, help="run directory (its best.pt) or checkpoint file"
    )
    parser.add_argument("--repo", type=Path, required=True, help="model repository folder")
    parser.add_argument("--name", required=True, help="model name (letters, digits, '.', '_', '-')")
    parser.add_argument("--version", type=int, help="version number (default: the next free one)")
    parser.add_argument("--force", action="store_true", help="replace an existing --version")
    parser.add_argument(
        "--variants",
        default="",
        help="comma-separated extra variants to build and "
        "measure: int8 (CPU, dynamic quantization), fp16 (CUDA)",
    )
    parser.add_argument(
        "--iw-samples",
        type=int,
        default=100,
        metavar="K",
        help="k for the NLL recorded in the manifest when the run has no saved test "
        "evaluation of this checkpoint (default 100)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_data_flags(parser)
    parser.set_defaults(handler=export_command)


def export_command(args: argparse.Namespace) -> int:
    require("vae export", "train", "onnx", "torch")
    from vaeserve.export.exporter import ExportRequest, export_model
    from vaeserve.export.variants import VARIANTS

    chosen = tuple(v for v in args.variants.split(",") if v)
    unknown = set(chosen) - set(VARIANTS)
    if unknown:
        raise ConfigError(f"--variants {sorted(unknown)}: expected some of {', '.join(VARIANTS)}")
    request = ExportRequest(
        args.checkpoint,
        args.repo,
        args.name,
        args.version,
        args.force,
        chosen,
        args.iw_samples,
        args.data_dir,
        args.cache_dir,
    )
    version = export_model(request, progress=not args.no_progress)
    manifest = version.manifest
    parity = max(manifest["parity"]["max_abs_diff"][k] for k in ("mean", "stddev", "probs"))
    print(
        f"exported {version.path}: D={version.input_size}, M={version.latent_size}, "
        f"parity with PyTorch {parity:.1e} (≤ 1e-5), variants {', '.join(version.variants)}, "
        f"test NLL_{manifest['evaluation']['iw_samples']} {manifest['evaluation']['nll']:.2f}"
    )
    return 0


def evaluate_model_command(args: argparse.Namespace) -> int:
    from vaeserve.datasets import evaluation_inputs, load_dataset
    from vaeserve.evaluation import evaluate
    from vaeserve.repository import open_path
    from vaeserve.runtime import OnnxPair
    from vaeserve.training.cli import print_evaluation

    version = open_path(args.model)
    pair = OnnxPair.load(version, variant=args.variant)
    dataset_name = args.dataset or version.manifest["training"]["dataset"]
    dataset = load_dataset(dataset_name, args.data_dir, args.cache_dir, progress=not args.no_progress)
    images, _ = dataset.split(args.split)
    if args.limit:
        images = images[: args.limit]
    x = evaluation_inputs(images, version.manifest["binarization"], seed=0)
    result = evaluate(
        pair.encode, pair.decode_logits, x, args.iw_samples, seed=0, progress=not args.no_progress
    )
    print_evaluation(result.to_dict(), args.split, args.json, None)
    return 0
