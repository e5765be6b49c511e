"""`vae client`: every RPC of a running server, shown the way the seed program showed its
model's uses, but as PNG files: reconstructions (Reconstruct), prior samples (SamplePrior),
a latent-manifold grid and an interpolation between two digits (Encode, then Decode); then the
test images' per-row scores (Score) and Encode's rows/s, by unary calls and by EncodeStream.
An imported autoencoder's: a photograph encoded and decoded, its latents' channels, and prior
latents decoded."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from vaeserve.client import VaeClient
from vaeserve.ood import REFERENCE_IW_SAMPLES, log_px_meaning

INTERPOLATION_STEPS = 10
SCORED_ROWS = 1000


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "client",
        help="call every RPC of a running server and write the pictures",
        description="Demo client: calls GetModelInfo, Encode, EncodeStream, Decode, Reconstruct, "
        "SamplePrior and Score on a running vae serve, writes PNGs of the model's uses and "
        "summary.json, and measures Encode rows/s.",
    )
    port = os.environ.get("VAESERVE_PORT", "50051")
    parser.add_argument(
        "--target",
        default=f"127.0.0.1:{port}",
        help="HOST:PORT of the server, $VAESERVE_PORT's port by default (default: %(default)s)",
    )
    parser.add_argument(
        "--dataset", default="mnist", help="dataset whose test images to send (default: %(default)s)"
    )
    parser.add_argument(
        "--data-dir", type=Path, help="read the dataset's IDX files from DIR (default: the download cache)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("out/demo"),
        help="folder for the PNGs and summary.json (default: %(default)s)",
    )
    parser.add_argument("--model", default="", help="model name; empty: the server's default model")
    parser.add_argument("--token-file", type=Path, help="file holding the server's bearer token")
    parser.add_argument("--tls-ca", type=Path, help="PEM CA to verify a TLS server")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of every random draw (default: %(default)s)"
    )
    parser.add_argument(
        "--image",
        type=Path,
        help="an imported autoencoder's: the photograph to encode and reconstruct (PNG or JPEG; cropped "
        "to multiples of its downscale factor); default: matplotlib's sample photograph",
    )
    parser.set_defaults(handler=client_command)


def client_command(args: argparse.Namespace) -> int:
    from vaeserve.datasets import load_dataset

    token = args.token_file.read_text().strip() if args.token_file else None
    with VaeClient(args.target, model=args.model, token=token, root_certificates=args.tls_ca) as client:
        info = served_model(client)  # the server first: a dead target is said before any download
        if info["family"] == "autoencoder":
            return autoencoder_demo(client, info, args)
        pixels = load_dataset(args.dataset, args.data_dir, progress=False).test_images
        summary = run_demo(client, info, pixels, args.out, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    info = summary["model"]
    print(
        f"{info['name']}/{info['version']} on {info['execution_provider']}: test ELBO "
        f"{info['metrics'].get('elbo', float('nan')):.2f}, NLL_{int(info['metrics'].get('iw_samples', 0))} "
        f"{info['metrics'].get('nll', float('nan')):.2f}; service Encode {summary['encode_rows_per_s']:,.0f} "
        f"rows/s (uint8, {summary['encoded_rows']:,} rows); pictures in {args.out}"
    )
    return 0


def served_model(client: VaeClient) -> dict:
    """What the client's calls reach: the model it names (its newest version, where calls that
    name none go), else the server's default."""
    if not client.model:
        return next(m for m in client.model_info() if m["is_default"])
    return max(client.model_info(client.model), key=lambda m: m["version"])


def run_demo(client: VaeClient, info: dict, pixels: np.ndarray, out: Path, seed: int) -> dict:
    from vaeserve import pictures

    shape = info["image_shape"]
    out.mkdir(parents=True, exist_ok=True)
    rebuilt = client.reconstruct(pixels[:64], seed=seed)
    originals = pixels[:64].astype(np.float32) / 255
    cols = 8
    pictures.save_panels(
        [
            ("originals", pictures.tile(originals, shape, cols)),
            ("probabilities", pictures.tile(rebuilt["probs"], shape, cols)),
            ("samples", pictures.tile(rebuilt["samples"], shape, cols)),
        ],
        out / "reconstruct.png",
        "Reconstruct: posterior predictive",
    )
    prior = client.sample_prior(64, seed=seed)
    pictures.save_panels(
        [
            ("probabilities", pictures.tile(prior["probs"], shape, cols)),
            ("samples", pictures.tile(prior["samples"], shape, cols)),
        ],
        out / "sample_prior.png",
        "SamplePrior: prior predictive, z ~ p(z)",
    )
    started = time.perf_counter()
    means = client.encode(pixels)["mean"]
    seconds = time.perf_counter() - started
    started = time.perf_counter()
    streamed = client.encode_stream(pixels)["mean"]
    stream_seconds = time.perf_counter() - started
    dims = tuple(int(d) for d in np.argsort(means.var(axis=0))[::-1][:2])
    manifold(client, dims, info["latent_size"], shape, out / "latent_manifold.png")
    interpolation(client, means, shape, out / "interpolation.png")
    scores = client.score(pixels[:SCORED_ROWS], iw_samples=REFERENCE_IW_SAMPLES, seed=seed)
    return {
        "model": info,
        "encoded_rows": len(pixels),
        "encode_rows_per_s": len(pixels) / seconds,
        "encode_stream_rows_per_s": len(pixels) / stream_seconds,
        "encode_stream_equals_encode": bool(np.array_equal(streamed, means)),
        "score": {
            "rows": len(scores["elbo"]),
            "iw_samples": REFERENCE_IW_SAMPLES,
            "log_px": log_px_meaning(REFERENCE_IW_SAMPLES),
            **{f"mean_{name}": float(values.mean()) for name, values in scores.items()},
        },
        "pictures": sorted(p.name for p in out.glob("*.png")),
    }


def manifold(client: VaeClient, dims: tuple[int, int], latent_size: int, shape: tuple, path: Path) -> None:
    from vaeserve import pictures

    steps, extent = 20, 2.5
    axis = np.linspace(-extent, extent, steps, dtype=np.float32)
    grid = np.stack(np.meshgrid(axis, axis[::-1]), axis=-1).reshape(-1, 2)
    z = np.zeros((len(grid), latent_size), np.float32)
    z[:, dims[0]], z[:, dims[1]] = grid[:, 0], grid[:, 1]
    probs = client.decode(z)["probs"]
    pictures.save_panels(
        [(f"z[{dims[0]}] →, z[{dims[1]}] ↑", pictures.tile(probs, shape, steps))],
        path,
        "Decode: latent manifold, other dimensions at 0",
    )


def interpolation(client: VaeClient, means: np.ndarray, shape: tuple, path: Path) -> None:
    """Decode the straight line between the latent means of a few pairs of test digits."""
    from vaeserve import pictures

    pairs = [(0, 1), (2, 3), (4, 5), (6, 7)]
    weights = np.linspace(0, 1, INTERPOLATION_STEPS, dtype=np.float32)[:, None]
    z = np.concatenate([(1 - weights) * means[a] + weights * means[b] for a, b in pairs])
    probs = client.decode(z)["probs"]
    pictures.save_panels(
        [("start → end", pictures.tile(probs, shape, INTERPOLATION_STEPS))],
        path,
        "Encode then Decode: interpolation between digits",
    )


# -- an imported latent-diffusion autoencoder (vae import --diffusers) -------------------------------
PRIOR_SAMPLES = 4


def photograph(path: Path | None, multiple: int) -> np.ndarray:
    """uint8 [H, W, 3]: the file, or matplotlib's sample photograph, cropped to multiples."""
    from PIL import Image, UnidentifiedImageError

    from vaeserve.errors import DataError

    if path is None:
        from matplotlib import cbook

        path = Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"--image {path}: not a readable image ({exc})") from None
    height, width = (pixels.shape[0] // multiple) * multiple, (pixels.shape[1] // multiple) * multiple
    if not height or not width:
        raise DataError(
            f"--image {path}: {pixels.shape[0]}×{pixels.shape[1]}, smaller than {multiple} pixels"
        )
    return np.ascontiguousarray(pixels[:height, :width])


def autoencoder_demo(client: VaeClient, info: dict, args: argparse.Namespace) -> int:
    """Your image in, its reconstruction out; prior latents decoded; the latents' channels;
    Encode's and Decode's time, and the reconstruction's PSNR, in summary.json."""
    from vaeserve import pictures

    multiple = 8  # every released latent-diffusion autoencoder's downscale factor
    photo = photograph(args.image, multiple)
    started = time.perf_counter()
    encoded = client.encode(photo[None])
    encode_seconds = time.perf_counter() - started
    started = time.perf_counter()
    images = client.decode(encoded["mean"])["images"]
    decode_seconds = time.perf_counter() - started
    rebuilt = np.clip((images[0].transpose(1, 2, 0) + 1) / 2, 0, 1)
    original = photo.astype(np.float32) / 255
    psnr = float(10 * np.log10(1 / max(float(np.mean((rebuilt - original) ** 2)), 1e-12)))
    out = args.out
    pictures.save_panels(
        [("your image", original), ("Encode, then Decode", rebuilt)],
        out / "reconstruct.png",
        f"{info['name']}/{info['version']}: Reconstruct ({photo.shape[0]}×{photo.shape[1]})",
    )
    latents = encoded["mean"][0]
    spread = (latents - latents.min()) / max(float(np.ptp(latents)), 1e-12)
    pictures.save_panels(
        [(f"channel {c}", spread[c]) for c in range(len(spread))],
        out / "latents.png",
        f"Encode: the latent mean's {len(spread)} channels ({latents.shape[1]}×{latents.shape[2]})",
    )
    side = max(latents.shape[1], latents.shape[2])
    prior = client.sample_prior(PRIOR_SAMPLES, seed=args.seed, latent_height=side, latent_width=side)
    drawn = [np.clip((image.transpose(1, 2, 0) + 1) / 2, 0, 1) for image in prior["images"]]
    pictures.save_panels(
        [(f"z ~ N(0, I), seed {args.seed}: {i}", image) for i, image in enumerate(drawn)],
        out / "sample_prior.png",
        "SamplePrior: N(0, I) latents decoded (a diffusion model's starting noise, not images)",
    )
    summary = {
        "model": info,
        "image_shape": list(photo.shape),
        "latent_shape": list(latents.shape),
        "encode_seconds": encode_seconds,
        "decode_seconds": decode_seconds,
        "reconstruction_psnr_db": psnr,
        "pictures": sorted(p.name for p in out.glob("*.png")),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"{info['name']}/{info['version']} ({info['execution_provider']}): {photo.shape[0]}×{photo.shape[1]} "
        f"image → latents {list(latents.shape)} in {encode_seconds:.2f} s, decoded in "
        f"{decode_seconds:.2f} s, "
        f"reconstruction PSNR {psnr:.1f} dB; pictures in {out}"
    )
    return 0
