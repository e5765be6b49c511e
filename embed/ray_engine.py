"""`vae embed --engine ray`: the same job on Ray Data, on a local Ray or an existing cluster.

The pipeline: a dataset of chunk numbers → ``map_batches(read_chunks)`` (tasks read their
chunks with the same streaming readers as the local engine, so every input format works and
row ids stay exact) → ``map_batches(Encoder, concurrency=N)`` (a pool of onnxruntime actors,
each loading the model once) → ``write_parquet`` (a folder of Parquet files). On a cluster
the input, the model repository and the output must be on storage every node can read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vaeserve.errors import MissingExtraError


def read_chunks(
    batch: dict[str, np.ndarray],
    path: str,
    image_shape: tuple[int, ...],
    chunk_rows: int,
    column: str | None,
    key: str | None,
) -> dict[str, np.ndarray]:
    """Rows of the chunks named in ``batch["chunk"]``, with their row ids."""
    from vaeserve.embed.pipeline import check_rows
    from vaeserve.embed.sources import open_source

    source = open_source(Path(path), image_shape, column, key)
    rows, ids = [], []
    for chunk in batch["chunk"]:
        data = next(source.chunks(chunk_rows, int(chunk)))
        rows.append(check_rows(data, source, int(chunk) * chunk_rows))
        ids.append(np.arange(int(chunk) * chunk_rows, int(chunk) * chunk_rows + len(data)))
    return {"row_id": np.concatenate(ids), "pixels": np.concatenate(rows)}


class Encoder:
    """One onnxruntime session per actor, loaded once and verified against the manifest."""

    def __init__(self, model: str, threads: int) -> None:
        from vaeserve.repository import open_path
        from vaeserve.runtime import OnnxPair

        version = open_path(Path(model))
        self.pair = OnnxPair.load(version, threads=threads)
        self.binarization = version.manifest.binarization

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from vaeserve.datasets import encoder_inputs

        pixels = np.stack(batch["pixels"]) if batch["pixels"].dtype == object else batch["pixels"]
        mean, stddev = self.pair.encode(encoder_inputs(pixels, self.binarization))
        return {"row_id": batch["row_id"], "mean": list(mean), "stddev": list(stddev)}


def run_ray(
    model: Path,
    source_path: Path,
    output: Path,
    chunks: int,
    chunk_rows: int,
    image_shape: tuple[int, ...],
    stddev: bool,
    column: str | None,
    key: str | None,
    address: str | None,
    workers: int,
) -> None:
    try:
        import ray
        import ray.data
    except ImportError:
        raise MissingExtraError("vae embed --engine ray", "ray", "ray") from None
    ray.init(
        address=address,
        ignore_reinit_error=True,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
    )
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # rows come out in input order
    context.enable_progress_bars = False
    dataset = ray.data.from_items([{"chunk": i} for i in range(chunks)], override_num_blocks=chunks)
    dataset = dataset.map_batches(
        read_chunks,
        batch_size=1,
        fn_kwargs={
            "path": str(source_path.resolve()),
            "image_shape": image_shape,
            "chunk_rows": chunk_rows,
            "column": column,
            "key": key,
        },
    )
    dataset = dataset.map_batches(
        Encoder,
        fn_constructor_kwargs={"model": str(model.resolve()), "threads": 1},
        concurrency=workers,
        batch_size=None,
    )
    if not stddev:
        dataset = dataset.drop_columns(["stddev"])
    try:
        dataset.write_parquet(str(output))
    finally:
        ray.shutdown()
