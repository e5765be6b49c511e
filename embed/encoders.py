"""The two ways `vae embed` runs the encoder, and `vae score` the scores, behind one interface.

``start(rows, records)`` begins encoding one chunk of checked rows into its output
records and returns a function that waits for it, so the job keeps the next chunk
encoding while the previous one is collected and written.

- `LocalEncoder`: in-process onnxruntime. Each chunk is cut into sub-batches run by a
  pool of threads on single-threaded onnxruntime calls (one per core). On a few cores
  this beats one call with a thread per core: a call split across threads waits for its
  slowest thread, so every moment the reader or writer takes a core stalls the whole
  call, while independent calls just keep going on the other core.
- `ServiceEncoder`: the gRPC service through the Python client, which prepares pixels
  on the server and keeps several requests in flight.
- `LocalScorer` and `ServiceScorer`: the same two for `vae score`'s per-row scores. Row i's
  draws are seeded by (seed, row_id), so local, service and resumed jobs agree exactly.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Protocol

import numpy as np

from vaeserve.datasets import encoder_inputs
from vaeserve.errors import VaeError
from vaeserve.ood import flag_percentiles, outside
from vaeserve.repository import ModelVersion

# An imported autoencoder's images per onnxruntime call: as many as hold about this many pixels.
IMAGE_PIXELS = 1 << 20
# Rows per onnxruntime call: small enough that two threads stay evenly loaded to the end
# of a chunk and their activations stay in cache, large enough to amortize the call.
SUB_BATCH = 1024

Wait = Callable[[], None]

# Clients of ServiceEncoder, each sending its share of every chunk.
CLIENTS = 2
# Rows per request to the service (measured on MNIST, benchmarks/embed_throughput.py):
# through shared memory a call costs the same whatever its size, so fewer, larger calls
# win; bytes in the messages pipeline better in smaller ones.
REQUEST_ROWS = {"shared memory": 2048, "bytes": 1024}


class ChunkEncoder(Protocol):
    def start(self, rows: np.ndarray, records: np.ndarray) -> Wait:
        """Encode ``rows`` into ``records['mean']`` (and ``['stddev']``); the result waits for it."""

    def close(self) -> None:
        """Stop the threads and release the session or channel."""


class LocalEncoder:
    def __init__(self, version: ModelVersion, threads: int = 0) -> None:
        from vaeserve.runtime import OnnxPair, usable_cores

        self.pair = OnnxPair.load(version, threads=1)
        self.binarization = version.manifest.binarization
        self.pool = ThreadPoolExecutor(threads or usable_cores(), thread_name_prefix="embed-encode")

    def start(self, rows: np.ndarray, records: np.ndarray) -> Wait:
        futures = [
            self.pool.submit(self._encode, rows[at : at + SUB_BATCH], records[at : at + SUB_BATCH])
            for at in range(0, len(rows), SUB_BATCH)
        ]
        return lambda: _results(futures)

    def _encode(self, rows: np.ndarray, records: np.ndarray) -> None:
        _store(records, *self.pair.encode(encoder_inputs(rows, self.binarization)))

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


class LatentEncoder:
    """An imported autoencoder's encoder in-process (vaeserve.runtime.AutoencoderGraphs): rows
    are images [H, W, C] flattened channels first; each chunk runs on one thread, in pieces of
    about IMAGE_PIXELS pixels, each piece one onnxruntime call on every core (and in tiles past
    the model's tile), so its activations stay bounded whatever the chunk's size."""

    def __init__(
        self, version: ModelVersion, images: tuple[int, int, int], pipeline: bool, threads: int = 0
    ) -> None:
        from vaeserve.runtime import AutoencoderGraphs

        self.graphs = AutoencoderGraphs(version, threads=threads)
        self.tiling = version.manifest.autoencoder.tiling
        height, width, channels = images
        self.layout = (channels, height, width)
        self.pipeline = pipeline
        self.per_call = max(1, IMAGE_PIXELS // (height * width))
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="embed-encode")

    def start(self, rows: np.ndarray, records: np.ndarray) -> Wait:
        future = self.pool.submit(self._encode, rows, records)
        return lambda: _results([future])

    def _encode(self, rows: np.ndarray, records: np.ndarray) -> None:
        for at in range(0, len(rows), self.per_call):
            images = rows[at : at + self.per_call].reshape(-1, *self.layout)
            mean, stddev = self.graphs.encode(images, self.tiling)
            if self.pipeline:
                scaled = self.graphs.pipeline_encoding({"mean": mean, "stddev": stddev})
                mean, stddev = scaled["mean"], scaled["stddev"]
            _store(records[at : at + self.per_call], mean, stddev)

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


class ServiceEncoder:
    """Two clients on two threads, each sending half of every chunk with its requests in
    flight together. The halves of the next chunk queue behind the current ones, so a
    client that finishes early starts on them and the server never waits between chunks."""

    def __init__(
        self,
        version: ModelVersion,
        target: str,
        images: tuple[int, int, int] | None = None,
        pipeline: bool = False,
        **client_options,
    ) -> None:
        """``images``: an imported autoencoder's [H, W, C], rows sent as images (``pipeline``:
        its latents scaled as a pipeline's)."""
        from vaeserve.client import VaeClient

        self.layout = None if images is None else (images[2], images[0], images[1])
        self.options = {"pipeline_latents": pipeline} if images is not None else {}
        model, number = version.name, str(version.version)
        wanted = REQUEST_ROWS["shared memory" if client_options.get("shared_memory") else "bytes"]
        with VaeClient(target, **client_options) as probe:  # no larger than the server takes
            rows = min([wanted] + [m["max_batch_rows"] for m in probe.model_info(model)])
        self.idle: queue.SimpleQueue = queue.SimpleQueue()
        self.clients = [
            VaeClient(target, model=model, version=number, chunk_rows=rows, **client_options)
            for _ in range(CLIENTS)
        ]
        self.pool = ThreadPoolExecutor(CLIENTS, thread_name_prefix="embed-call")
        # Connecting and setting up shared memory overlap with reading the first chunk.
        for client in self.clients:
            self.pool.submit(self._warm_up, client)

    def _warm_up(self, client) -> None:
        """A failure here is raised again, with its status, by the client's first call."""
        try:
            client.warm_up()
        except VaeError:
            pass
        finally:
            self.idle.put(client)

    def start(self, rows: np.ndarray, records: np.ndarray) -> Wait:
        half = -(-len(rows) // len(self.clients))
        futures = [
            self.pool.submit(self._encode, rows[at : at + half], records[at : at + half])
            for at in range(0, len(rows), half)
        ]
        return lambda: _results(futures)

    def _encode(self, rows: np.ndarray, records: np.ndarray) -> None:
        client = self.idle.get()
        fields = {name: records[name] for name in ("mean", "stddev") if name in records.dtype.names}
        if self.layout is not None:
            rows = rows.reshape(-1, *self.layout)
        try:
            client.encode(rows, out=fields, **self.options)  # written straight into the records
        finally:
            self.idle.put(client)

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)
        with ThreadPoolExecutor(len(self.clients)) as closing:  # each unregisters its memory
            list(closing.map(lambda client: client.close(), self.clients))


class LocalScorer(LocalEncoder):
    """LocalEncoder's threads and sessions, each sub-batch scored from its first row id."""

    def __init__(self, version: ModelVersion, iw_samples: int, seed: int, threads: int = 0) -> None:
        super().__init__(version, threads)
        self.version, self.iw_samples, self.seed = version, iw_samples, seed
        self.prior = version.load_prior()
        self.flag_at = flag_percentiles(version.manifest.score_reference, iw_samples)

    def _encode(self, rows: np.ndarray, records: np.ndarray) -> None:
        from vaeserve.ood import scores

        out = scores(
            self.pair.encode,
            self.pair.decode_logits,
            encoder_inputs(rows, self.binarization),
            self.iw_samples,
            self.seed,
            self.version.likelihood,
            self.version.image_shape,
            first_row=int(records["row_id"][0]),
            prior=self.prior,
        )
        _store_scores(records, out, self.flag_at)


class ServiceScorer(ServiceEncoder):
    """ServiceEncoder's two clients, calling Score with each piece's first row id."""

    def __init__(self, version: ModelVersion, target: str, iw_samples: int, seed: int, **client_options):
        super().__init__(version, target, **client_options)
        self.iw_samples, self.seed = iw_samples, seed
        self.flag_at = flag_percentiles(version.manifest.score_reference, iw_samples)

    def _encode(self, rows: np.ndarray, records: np.ndarray) -> None:
        client = self.idle.get()
        try:
            out = client.score(rows, self.iw_samples, self.seed, row_offset=int(records["row_id"][0]))
        finally:
            self.idle.put(client)
        _store_scores(records, out, self.flag_at)


def _store_scores(records: np.ndarray, out: dict[str, np.ndarray], flag_at: dict[str, float] | None) -> None:
    """The scores, and with a reference at the same k, each row flagged among the test set's."""
    for name, values in out.items():
        records[name] = values
    if flag_at is not None:
        records["ood_flag"] = outside(out["ood_score"], flag_at)


def _store(records: np.ndarray, mean: np.ndarray, stddev: np.ndarray) -> None:
    records["mean"] = mean
    if "stddev" in records.dtype.names:
        records["stddev"] = stddev


def _results(futures: list) -> None:
    """Wait for every sub-batch, then raise the first failure, if any."""
    wait(futures)
    for future in futures:
        future.result()
