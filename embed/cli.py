"""`vae embed` and `vae score`: numpy and onnxruntime (or the service) only, no torch."""

from __future__ import annotations

import argparse
from pathlib import Path

from vaeserve.ood import REFERENCE_IW_SAMPLES
from vaeserve.storage import location


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "embed",
        help="embed a whole dataset into latent means (and stddevs)",
        description="Stream a dataset (IDX, .npy, .npz, Parquet or a folder of PNG/JPEG images) through "
        "the encoder in chunks and write row_id, mean (and stddev) to .npy or Parquet, with a "
        "sidecar DST.manifest.json. Resumable after any crash with --resume.",
    )
    _add_job_flags(parser, "encode")
    parser.add_argument("--stddev", action="store_true", help="also write the latent standard deviations")
    parser.add_argument(
        "--shared-memory",
        action="store_true",
        help="with --server on this host (started with --shared-memory): pass chunks through "
        "shared memory instead of the socket",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="in-process encoder threads, each making single-threaded onnxruntime calls (0: one per core)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="an imported autoencoder's images: resize every image to H×W (default: the input's own "
        "size, one for all; an image of another size is refused)",
    )
    parser.add_argument(
        "--pipeline-latents",
        action="store_true",
        help="an imported autoencoder's latents as a pipeline has them, (z − shift) · scale",
    )
    parser.set_defaults(handler=embed_command)


def register_score(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "score",
        help="score every row of a dataset: ELBO, log p(x), out-of-distribution score",
        description="Stream a dataset through the model's scores and write row_id, elbo, log_px "
        "(k importance samples), complexity_bits (PNG) and ood_score (−log2 p(x) − bits; higher: "
        "less like the training data) to .npy or Parquet, with a sidecar DST.manifest.json. "
        "Seeded per row, so local, --server and resumed jobs give the same scores.",
    )
    _add_job_flags(parser, "score")
    parser.add_argument(
        "--iw-samples",
        type=int,
        default=REFERENCE_IW_SAMPLES,
        help=f"importance samples k per row for log_px (default {REFERENCE_IW_SAMPLES}, the k of the "
        "test-set percentiles export records, which ood_flag compares with; k = 1 is the ELBO)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    parser.add_argument("--threads", type=int, default=0, help="in-process scoring threads (0: one per core)")
    parser.set_defaults(handler=score_command)


def _add_job_flags(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument(
        "--model",
        type=location,
        required=True,
        help="models/NAME or models/NAME/VERSION, or the same on object storage (s3://BUCKET/models/NAME)",
    )
    parser.add_argument(
        "--input",
        type=location,
        required=True,
        help="IDX (raw or .gz), .npy, .npz, .parquet file, a folder of PNG/JPEG images, or a folder of "
        ".parquet/.npy parts; on object storage (s3://, gs://) a .parquet/.npy object or a prefix of them",
    )
    parser.add_argument(
        "--output",
        type=location,
        required=True,
        help="DST.npy or DST.parquet; on object storage (or with --engine ray) DST.parquet is a "
        "prefix of Parquet parts, complete once DST.parquet/_SUCCESS and the sidecar say so",
    )
    parser.add_argument(
        "--server",
        help=f"HOST:PORT: {verb} through the gRPC service instead of in-process; several replicas as "
        "IP:PORT,IP:PORT or dns:///NAME:PORT, calls spread over them",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue an interrupted job, skipping chunks already written"
    )
    parser.add_argument("--force", action="store_true", help="overwrite a finished output or restart")
    parser.add_argument("--chunk-rows", type=int, default=8192, help="rows per chunk (default 8192)")
    parser.add_argument(
        "--column",
        help="Parquet column of list rows (default: the only column, else every column is one pixel)",
    )
    parser.add_argument("--key", help=".npz array to read (default: x, else the first)")
    parser.add_argument("--token-file", type=Path, help="with --server: file holding the bearer token")
    parser.add_argument("--tls-ca", type=Path, help="with --server: PEM CA of a TLS server")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this process (default); ray: Ray tasks, each reading, encoding and writing its "
        "chunks (writes a partitioned Parquet dataset; resumable)",
    )
    parser.add_argument(
        "--ray-address", help="with --engine ray: the cluster's address (default: a local Ray)"
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="with --engine ray: chunks encoded at a time (default 2)"
    )


def _request(args: argparse.Namespace, **job):
    from vaeserve.embed.job import EmbedRequest

    token = args.token_file.read_text().strip() if args.token_file else None
    return EmbedRequest(
        args.model,
        args.input,
        args.output,
        server=args.server,
        resume=args.resume,
        force=args.force,
        chunk_rows=args.chunk_rows,
        column=args.column,
        key=args.key,
        token=token,
        tls_ca=args.tls_ca,
        threads=args.threads,
        engine=args.engine,
        ray_address=args.ray_address,
        workers=args.workers,
        **job,
    )


def embed_command(args: argparse.Namespace) -> int:
    from vaeserve.embed.job import run

    request = _request(
        args,
        stddev=args.stddev,
        shared_memory=args.shared_memory,
        image_size=tuple(args.image_size) if args.image_size else None,
        pipeline_latents=args.pipeline_latents,
    )
    summary = run(request, progress=not args.no_progress)
    if summary["complete_before"]:
        print(f"nothing to do: {summary['output']} is complete ({summary['rows']:,} rows)")
        return 0
    print(
        f"embedded {summary['rows']:,} rows into {summary['output']} ({summary['embedded_now']:,} now, "
        f"{summary['rows_per_s']:,.0f} rows/s); manifest {summary['output']}.manifest.json"
    )
    return 0


def score_command(args: argparse.Namespace) -> int:
    from vaeserve.embed.job import run

    request = _request(args, score=True, iw_samples=args.iw_samples, seed=args.seed)
    summary = run(request, progress=not args.no_progress)
    if summary["complete_before"]:
        print(f"nothing to do: {summary['output']} is complete ({summary['rows']:,} rows)")
        return 0
    print(
        f"scored {summary['rows']:,} rows into {summary['output']} ({summary['embedded_now']:,} now, "
        f"{summary['rows_per_s']:,.0f} rows/s); manifest {summary['output']}.manifest.json"
    )
    score = summary["score"]
    print(f"{score['log_px']}\n{score['ood_flag']}")
    return 0
