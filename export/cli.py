"""`vae export`, `vae export-triton` and `vae label`."""

from __future__ import annotations

import argparse
from pathlib import Path

from vaeserve.errors import ConfigError, VaeError, require
from vaeserve.flags import add_data_flags
from vaeserve.storage import ObjectPath, location

REPO_HELP = "model repository: a folder, or s3://BUCKET/PREFIX (gs://, ...) on object storage"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a checkpoint as encoder/decoder ONNX graphs into a model repository",
        description="Export a checkpoint to REPO/NAME/VERSION/{encoder.onnx, decoder.onnx, "
        "manifest.json}. The version appears atomically, only after every check passed.",
    )
    parser.add_argument(
        "--checkpoint", type=Path, required=True, help="run directory (its best.pt) or checkpoint file"
    )
    parser.add_argument("--repo", type=location, required=True, help=REPO_HELP)
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


def register_triton(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export-triton",
        help="write an exported version as a Triton Inference Server model repository",
        description="Write OUT/NAME-encoder and OUT/NAME-decoder (config.pbtxt for Triton's onnxruntime "
        "backend with dynamic batching, and VERSION/model.onnx) from a verified version of the "
        "vaeserve repository. Triton serves the graphs only: sampling, seeds and raw pixels are vaeserve's.",
    )
    parser.add_argument("--repo", type=Path, required=True, help="vaeserve model repository folder")
    parser.add_argument("--name", required=True, help="model name in the repository")
    parser.add_argument("--version", default="latest", help="version number or latest (default: latest)")
    parser.add_argument("--out", type=Path, required=True, help="Triton model repository to write into")
    parser.add_argument(
        "--max-batch-size", type=int, default=4096, help="Triton's max_batch_size (default 4096)"
    )
    parser.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=500,
        help="dynamic batching: most microseconds a request waits for others (default 500)",
    )
    parser.add_argument("--force", action="store_true", help="replace the version if Triton's folder has it")
    parser.set_defaults(handler=export_triton_command)


def register_import(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import",
        help="import a diffusers AutoencoderKL or AutoencoderTiny (latent diffusion) as a version",
        description="Export a folder written by diffusers' save_pretrained (config.json and weights) of an "
        "AutoencoderKL (Stable Diffusion, SDXL, SD3, FLUX) or AutoencoderTiny (TAESD) as encoder and decoder "
        "ONNX graphs with dynamic batch, height and width, checked against diffusers on the same weights, "
        "into REPO/NAME/VERSION. Needs the diffusers extra; serving it does not.",
    )
    parser.add_argument(
        "--diffusers", type=Path, required=True, metavar="DIR", help="the autoencoder's folder"
    )
    parser.add_argument("--repo", type=Path, required=True, help="model repository folder")
    parser.add_argument("--name", required=True, help="model name (letters, digits, '.', '_', '-')")
    parser.add_argument("--version", type=int, help="version number (default: the next free one)")
    parser.add_argument("--force", action="store_true", help="replace an existing --version")
    parser.add_argument(
        "--variants",
        default="",
        help="fp16: also float16 graphs (for CUDA), their parity with diffusers recorded",
    )
    parser.set_defaults(handler=import_command)


def import_command(args: argparse.Namespace) -> int:
    require("vae import", "diffusers", "diffusers", "torch", "onnx")
    from vaeserve.export.diffusers_import import ImportRequest, import_autoencoder

    chosen = tuple(v for v in args.variants.split(",") if v)
    request = ImportRequest(args.diffusers, args.repo, args.name, args.version, args.force, chosen)
    version = import_autoencoder(request)
    manifest, record = version.manifest, version.manifest.autoencoder
    worst = max(manifest.parity["max_abs_diff"].values())
    shift = f", shift {record.shift_factor:g}" if record.shift_factor else ""
    print(
        f"imported {version.path}: {record.diffusers_class}, {record.latent_channels} latent channels at 1/"
        f"{record.downscale} of the image's side, scaling {record.scaling_factor:g}{shift}; parity with "
        f"diffusers {worst:.1e}; variants {', '.join(version.variants)}"
    )
    return 0


def register_label(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "label",
        help="name versions of a model (stable=1 canary=2) for requests to ask for by name",
        description="Set or remove version labels in REPO/NAME/labels.json, written whole and renamed "
        "into place; a server started with --poll-s follows the file. Without LABEL=VERSION "
        "arguments, print the labels.",
    )
    parser.add_argument("--repo", type=location, required=True, help=REPO_HELP)
    parser.add_argument("--name", required=True, help="model name in the repository")
    parser.add_argument("assignments", nargs="*", metavar="LABEL=VERSION", help="labels to set")
    parser.add_argument("--remove", nargs="+", default=[], metavar="LABEL", help="labels to remove")
    parser.set_defaults(handler=label_command)


def label_command(args: argparse.Namespace) -> int:
    from vaeserve.remote_repository import model_labels, model_versions, update_model_labels
    from vaeserve.repository import check_label

    versions = model_versions(args.repo, args.name)
    if not versions:
        raise ConfigError(f"--repo {args.repo} --name {args.name}: no versions in {args.repo / args.name}")

    def change(labels: dict[str, int]) -> dict[str, int]:
        for assignment in args.assignments:
            label, equals, version = assignment.partition("=")
            if not equals or not version.isdecimal():
                raise ConfigError(f"{assignment!r}: expected LABEL=VERSION, such as stable=1")
            if int(version) not in versions:
                raise ConfigError(f"{assignment!r}: {args.name} has no version {version} (has {versions})")
            labels[check_label(label)] = int(version)
        for label in args.remove:
            if labels.pop(label, None) is None:
                raise ConfigError(f"--remove {label}: {args.name} has no such label (has {sorted(labels)})")
        return labels

    if args.assignments or args.remove:
        labels = update_model_labels(args.repo, args.name, change)  # read, change, write: one at a time
    else:
        labels = model_labels(args.repo, args.name)
    for label, version in sorted(labels.items()):
        print(f"{args.name} {label} = {version}")
    if not labels:
        print(f"{args.name}: no labels (versions {versions}); set one with LABEL=VERSION, such as stable=1")
    return 0


def register_traffic(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "traffic",
        help="split calls that name no version between versions (1=80 2=20), and mirror them to a shadow",
        description="Set how a model's calls that name no version are split between versions or "
        "labels, by weight, and which version, if any, receives a mirrored copy of each such call "
        "off the caller's path (--shadow): REPO/NAME/traffic.json, written whole; a server started "
        "with --poll-s follows it. Without KEY=WEIGHT arguments, print the split.",
    )
    parser.add_argument("--repo", type=location, required=True, help=REPO_HELP)
    parser.add_argument("--name", required=True, help="model name in the repository")
    parser.add_argument(
        "weights", nargs="*", metavar="KEY=WEIGHT", help="a version number or label and its weight (> 0)"
    )
    parser.add_argument(
        "--shadow", default="", metavar="KEY", help="version number or label to mirror calls to"
    )
    parser.add_argument(
        "--clear", action="store_true", help="remove the split: calls naming no version go to the latest"
    )
    parser.set_defaults(handler=traffic_command)


def traffic_command(args: argparse.Namespace) -> int:
    from vaeserve.remote_repository import model_labels, model_traffic, model_versions, set_model_traffic
    from vaeserve.repository import TrafficSplit, check_key

    versions = model_versions(args.repo, args.name)
    if not versions:
        raise ConfigError(f"--repo {args.repo} --name {args.name}: no versions in {args.repo / args.name}")
    labels = model_labels(args.repo, args.name)

    def known(key: str, what: str) -> str:
        try:
            check_key(key)
        except VaeError as exc:
            raise ConfigError(f"{what}: {exc}") from None
        if key.isdecimal() and int(key) not in versions:
            raise ConfigError(f"{what}: {args.name} has no version {key} (has {versions})")
        if not key.isdecimal() and key not in labels:
            raise ConfigError(f"{what}: {args.name} has no label {key!r} (has {sorted(labels) or 'none'})")
        return key

    if args.clear:
        if args.weights or args.shadow:
            raise ConfigError("--clear removes the split: give it no KEY=WEIGHT and no --shadow")
        set_model_traffic(args.repo, args.name, None)
        print(f"{args.name}: no traffic split; calls naming no version go to the latest")
        return 0
    if args.weights:
        weights: dict[str, int] = {}
        for given in args.weights:
            key, equals, weight = given.partition("=")
            if not equals or not weight.isdecimal() or int(weight) < 1:
                raise ConfigError(f"{given!r}: expected KEY=WEIGHT with a weight above 0, such as 1=80")
            weights[known(key, given)] = int(weight)
        shadow = known(args.shadow, f"--shadow {args.shadow}") if args.shadow else ""
        if shadow and shadow in weights:
            raise ConfigError(f"--shadow {shadow}: it already answers callers ({given}); mirror to another")
        set_model_traffic(args.repo, args.name, TrafficSplit(weights, shadow))
    elif args.shadow:
        raise ConfigError("--shadow needs the split it mirrors: KEY=WEIGHT ..., such as 1=100 --shadow 2")
    split = model_traffic(args.repo, args.name)
    if split is None:
        print(f"{args.name}: no traffic split; calls naming no version go to the latest")
        return 0
    for key, share in split.shares().items():
        print(f"{args.name} {key}: {share:.0%} of calls naming no version")
    if split.shadow:
        print(
            f"{args.name} {split.shadow}: shadow (a mirrored copy of each of those calls, answered to no one)"
        )
    return 0


def export_triton_command(args: argparse.Namespace) -> int:
    from vaeserve.export.triton import TritonExport, export_triton
    from vaeserve.repository import resolve

    if args.max_batch_size < 1 or args.max_queue_delay_us < 0:
        raise ConfigError("--max-batch-size must be at least 1 and --max-queue-delay-us not negative")
    version = resolve(args.repo, args.name, args.version)
    request = TritonExport(args.out, args.max_batch_size, args.max_queue_delay_us, args.force)
    for folder in export_triton(version, request):
        print(f"wrote {folder}/{version.version}/model.onnx and {folder}/config.pbtxt")
    return 0


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
    if isinstance(args.repo, ObjectPath):
        from vaeserve.export.exporter import export_to_store

        version, where = export_to_store(request, progress=not args.no_progress)
    else:
        version = export_model(request, progress=not args.no_progress)
        where = version.path
    manifest = version.manifest
    parity, rounding = (
        max(manifest.parity[measure][k] for k in ("mean", "stddev", "probs"))
        for measure in ("max_abs_diff", "float32_rounding")
    )
    print(
        f"exported {where}: D={version.input_size}, M={version.latent_size}, "
        f"parity with PyTorch {parity:.1e} (its own float32 rounding {rounding:.1e}), "
        f"variants {', '.join(version.variants)}, "
        f"test NLL_{manifest.evaluation['iw_samples']} {manifest.evaluation['nll']:.2f}"
    )
    if manifest.training.get("stopped_early"):
        print(f"note: {manifest.training['stopped_early']} (recorded in the manifest)")
    return 0
