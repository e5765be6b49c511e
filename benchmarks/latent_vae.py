"""Latent-diffusion autoencoders: diffusers in PyTorch beside onnxruntime in-process and `vae serve`.

    python -m benchmarks.latent_vae                        # the full table (long on 2 cores)
    python -m benchmarks.latent_vae --sizes 256 --tiled 1024
    python -m benchmarks.latent_vae --models taesd --tiled 0   # one model's cells only

Two models with seeded random weights, saved by diffusers' ``save_pretrained`` and imported by
``vae import --diffusers`` (the compute is the real models' own; nothing is downloaded): an
``AutoencoderKL`` with Stable Diffusion 1.5's config (channels 128-256-512-512, two layers per
block, 4 latent channels) and an ``AutoencoderTiny`` with TAESD's. For each, encode and decode
images/s at each size and batch, on the same inputs, in one run:

- **diffusers**: ``encode(x).latent_dist`` / ``encode(x).latents`` and ``decode(z).sample``
  under ``torch.no_grad()``, torch's default threads (what users run today);
- **in-process**: the imported graphs on onnxruntime, sessions opened as the service opens them;
- **served**: `vae serve` (one worker, its default threads) called over vae.v1 with float32
  tensors by a client in this process, one call at a time; the client's CPU is reported.

Each cell: the three runtimes take turns call by call (see ``in_turns``): a warm-up round at its
shape, then rounds until each has spent ``--seconds`` (at least ``--repeats``); each one's median
call (a warm-up round whose every call is longer than ``--seconds`` is the figure itself).
Then a tiled decode of a ``--tiled``-pixel image (latents of a side / 8), each runtime in a
process of its own so its peak RSS is its own: diffusers with
``enable_tiling()``, vaeserve's tiling over the imported decoder, and the decoder untiled under
an address-space limit (``--untiled-limit-gb``), which shows what the tiles save.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from benchmarks.service_throughput import server

SEED = 0
# Stable Diffusion 1.5's vae/config.json (diffusers' AutoencoderKL), as published.
SD15 = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
MODELS = ("sd15", "taesd")


def build(work: Path) -> Path:
    """Both models saved and imported into ``work/models`` (kept: a second run reuses them)."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny

    from vaeserve.export.diffusers_import import ImportRequest, import_autoencoder

    repo = work / "models"
    for name, make in (("sd15", lambda: AutoencoderKL(**SD15)), ("taesd", AutoencoderTiny)):
        if (repo / name / "1").is_dir():
            continue
        torch.manual_seed(SEED)
        make().save_pretrained(work / name)
        import_autoencoder(ImportRequest(work / name, repo, name))
    return repo


PAUSE_S = 0.1  # before each call: no runtime's threads are still spinning from its own last call


def in_turns(calls: dict[str, Callable[[], object]], seconds: float, repeats: int) -> dict[str, list[float]]:
    """Each runtime's call times, the runtimes taking turns call by call (the order rotating each
    round), so that a machine whose speed drifts (other tenants of the host, clocks) slows all of
    them alike and their ratios stay fair; measured one after another, two runs of the same cell
    differed by a third. The first round warms each up; it is the figure itself when every call
    in it took over ``seconds`` (at tens of seconds a call, a first call's allocations are noise);
    otherwise it is dropped and rounds go on until there are ``repeats`` and each runtime has
    spent ``seconds``."""
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    rounds = 0
    while True:
        for name in names[rounds % len(names) :] + names[: rounds % len(names)]:
            time.sleep(PAUSE_S)
            begin = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - begin)
        rounds += 1
        if rounds == 1:
            if all(t[0] > seconds for t in times.values()):
                return times
            times = {name: [] for name in names}
        elif rounds - 1 >= repeats and all(sum(t) >= seconds for t in times.values()):
            return times


def inputs(size: int, batch: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SEED)
    images = rng.uniform(-1, 1, (batch, 3, size, size)).astype(np.float32)
    latents = rng.standard_normal((batch, channels, size // 8, size // 8)).astype(np.float32)
    return images, latents


def diffusers_model(work: Path, name: str):
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    kind = json.loads((work / name / "config.json").read_text())["_class_name"]
    return getattr(diffusers, kind).from_pretrained(work / name, low_cpu_mem_usage=False).eval()


def measure(work: Path, repo: Path, models, sizes, batches, seconds: float, repeats: int) -> list[dict]:
    import grpc

    from vaeserve._proto import vae_pb2_grpc
    from vaeserve.repository import resolve
    from vaeserve.runtime import open_session

    cells = []
    with server(repo, None, "--max-message-mb", "512", "--default-model", models[0]) as served:
        options = [
            ("grpc.max_receive_message_length", 512 << 20),
            ("grpc.max_send_message_length", 512 << 20),
        ]
        with grpc.insecure_channel(served.target, options=options) as channel:
            stub = vae_pb2_grpc.VaeServiceStub(channel)
            for name in models:
                version = resolve(repo, name)
                runtimes = Runtimes(
                    name,
                    diffusers_model(work, name),
                    open_session(version.graph_path("encoder"), ["CPUExecutionProvider"]),
                    open_session(version.graph_path("decoder"), ["CPUExecutionProvider"]),
                    stub,
                    version.manifest.autoencoder.stochastic,
                )
                for size in sizes:
                    for batch in batches:
                        images, latents = inputs(size, batch, version.manifest.autoencoder.latent_channels)
                        row = {
                            "model": name,
                            "size": size,
                            "batch": batch,
                            **runtimes.cell(images, latents, seconds, repeats),
                        }
                        cells.append(row)
                        print_cell(row)
    return cells


class Runtimes:
    """One model three ways: diffusers, its graphs in-process, and `vae serve` over vae.v1."""

    def __init__(self, name: str, model, encoder, decoder, stub, stochastic: bool) -> None:
        self.name, self.model, self.encoder, self.decoder = name, model, encoder, decoder
        self.stub, self.stochastic = stub, stochastic

    def torch_encode(self, images: np.ndarray):
        import torch

        with torch.no_grad():
            out = self.model.encode(torch.from_numpy(images))
            return out.latent_dist.mean if self.stochastic else out.latents

    def torch_decode(self, latents: np.ndarray):
        import torch

        with torch.no_grad():
            return self.model.decode(torch.from_numpy(latents)).sample

    def cell(self, images: np.ndarray, latents: np.ndarray, seconds: float, repeats: int) -> dict:
        from vaeserve._proto import vae_pb2
        from vaeserve.codec import to_tensor

        encode = vae_pb2.EncodeRequest(model=self.name, inputs=to_tensor(images))
        decode = vae_pb2.DecodeRequest(model=self.name, latents=to_tensor(latents))
        client_cpu = [0.0]

        def served(call: Callable[[], object]) -> Callable[[], object]:
            def timed_call() -> object:  # the client's CPU: only its own calls' (the others run here too)
                begin = time.process_time()
                try:
                    return call()
                finally:
                    client_cpu[0] += time.process_time() - begin

            return timed_call

        turns = {
            "encode": in_turns(
                {
                    "diffusers": lambda: self.torch_encode(images),
                    "in_process": lambda: self.encoder.run(["mean", "stddev"], {"images": images}),
                    "served": served(lambda: self.stub.Encode(encode, timeout=600)),
                },
                seconds,
                repeats,
            ),
            "decode": in_turns(
                {
                    "diffusers": lambda: self.torch_decode(latents),
                    "in_process": lambda: self.decoder.run(None, {"latents": latents}),
                    "served": served(lambda: self.stub.Decode(decode, timeout=600)),
                },
                seconds,
                repeats,
            ),
        }
        return {
            **{
                call: {runtime: statistics.median(times) for runtime, times in runtimes.items()}
                for call, runtimes in turns.items()
            },
            "calls": {call: len(runtimes["served"]) for call, runtimes in turns.items()},  # 1: the warm-up
            "client_cpu_s": client_cpu[0],
        }


def print_cell(row: dict) -> None:
    for direction in ("encode", "decode"):
        t = row[direction]
        rate = {k: row["batch"] / v for k, v in t.items()}
        print(
            f"| {row['model']} | {direction} | {row['size']}² | {row['batch']} | {rate['diffusers']:.2f} | "
            f"{rate['in_process']:.2f} ({rate['in_process'] / rate['diffusers']:.2f}×) | "
            f"{rate['served']:.2f} ({rate['served'] / rate['diffusers']:.2f}×) | {row['calls'][direction]} | "
            f"{row['client_cpu_s']:.2f} |",
            flush=True,
        )


# -- the tiled decode, each runtime in its own process ----------------------------------------------
def _tiled_worker(how: str, work: str, side: int, limit_gb: float, queue) -> None:
    if how == "untiled" and limit_gb:
        limit = int(limit_gb * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    latents = np.random.default_rng(SEED).standard_normal((1, 4, side // 8, side // 8)).astype(np.float32)
    try:
        decode = _tiled_decoder(how, Path(work))  # loading is not timed
        started = time.perf_counter()
        image = decode(latents)
        outcome = {"seconds": time.perf_counter() - started, "shape": list(image.shape)}
        np.save(Path(work) / f"tiled-{how}.npy", image)
    except Exception as exc:  # the untiled run is expected to fail for memory
        outcome = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
    outcome["peak_rss_mb"] = peak_rss_mb()
    queue.put(outcome)


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: its own, where getrusage's ru_maxrss keeps the
    parent's high-water mark across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _tiled_decoder(how: str, work: Path) -> Callable[[np.ndarray], np.ndarray]:
    """diffusers with enable_tiling(), vaeserve's decode (tiled past a tile, as the service
    decodes), or the imported decoder run whole."""
    if how == "diffusers":
        import torch

        model = diffusers_model(work, "sd15")
        model.enable_tiling()

        def decode(latents: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return model.decode(torch.from_numpy(latents)).sample.numpy()

        return decode
    from vaeserve.repository import resolve
    from vaeserve.runtime import AutoencoderGraphs

    version = resolve(work / "models", "sd15")
    graphs = AutoencoderGraphs(version)
    if how == "vaeserve":
        return lambda latents: graphs.decode(latents, version.manifest.autoencoder.tiling)
    return lambda latents: graphs.decoder.run(None, {"latents": latents})[0]


def tiled(work: Path, side: int, limit_gb: float) -> dict:
    context = multiprocessing.get_context("spawn")
    results = {}
    for how in ("diffusers", "vaeserve", "untiled"):
        queue = context.Queue()
        process = context.Process(target=_tiled_worker, args=(how, str(work), side, limit_gb, queue))
        process.start()
        process.join()
        results[how] = queue.get() if not queue.empty() else {"error": f"exit code {process.exitcode}"}
        print(f"tiled {side}²: {how}: {results[how]}", flush=True)
    if "error" not in results["diffusers"] and "error" not in results["vaeserve"]:
        difference = np.abs(
            np.load(work / "tiled-diffusers.npy") - np.load(work / "tiled-vaeserve.npy")
        ).max()
        results["max_abs_diff_vaeserve_vs_diffusers"] = float(difference)
        print(f"tiled {side}²: vaeserve's image - diffusers': max abs {difference:.1e}", flush=True)
    return results


@contextlib.contextmanager
def workspace(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="vaeserve-latent-") as folder:
        yield Path(folder)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="whose cells")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seconds", type=float, default=3.0, help="least time per cell and runtime")
    parser.add_argument("--repeats", type=int, default=1, help="least calls per cell and runtime")
    parser.add_argument("--tiled", type=int, default=2048, help="side of the tiled decode (0: none)")
    parser.add_argument("--untiled-limit-gb", type=float, default=12.0, help="the untiled decode's memory")
    parser.add_argument("--work", type=Path, help="keep the models here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with workspace(args.work) as work:
        repo = build(work)
        print(f"cores {os.cpu_count()}; images/s (× diffusers)")
        print(
            "| model | call | image | batch | diffusers | in-process onnxruntime | vae serve | calls each "
            "| client CPU s |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        cells = measure(work, repo, args.models, args.sizes, args.batches, args.seconds, args.repeats)
        figures = {"cells": cells}
        if args.tiled:
            figures["tiled"] = tiled(work, args.tiled, args.untiled_limit_gb)
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
