"""What the operating parts cost and save, each server beside one without the part, taking turns
in one run (`vae serve --workers 1`, one process each; the other idles meanwhile):

- the response cache (`--cache-mb`): Encode calls that all hit (`vae bench`'s default, one
  repeated request), that all miss (`--distinct` larger than the run's calls: every key new),
  and a server without a cache; hits and misses as the server's metrics page counted them;
- a traffic split's shadow (`vae traffic NAME 1=100 --shadow 2`): calls naming no version, with
  and without a shadow running a copy of each on the same two cores;
- bounded residency (`--max-loaded-models 2`): one caller rotating over three models, so every
  call finds its model evicted (least recently used, the worst case), beside a server holding all.

    python -m benchmarks.operations --model models/mnist/1 --data-dir ../shared/data/mnist
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from benchmarks.load import run_load
from benchmarks.service_throughput import Served, server
from vaeserve._proto import vae_pb2
from vaeserve.client import VaeClient
from vaeserve.codec import to_tensor
from vaeserve.datasets import load_dataset
from vaeserve.remote_repository import set_model_traffic
from vaeserve.repository import TrafficSplit, copy_version, open_path
from vaeserve.service.metrics import sample_total

CELLS = ((1, 1), (64, 4), (1024, 1))  # (batch rows, concurrent callers)


def page(served: Served) -> str:
    url = f"http://127.0.0.1:{served.metrics_port}/metrics"
    return urllib.request.urlopen(url, timeout=10).read().decode()


def counted(served: Served, name: str, **labels: str) -> float:
    return sample_total(page(served), name, **labels)


def median_cell(runs: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in runs) for key in ("rows_per_s", "p50_ms", "p99_ms")}


def cache(repo: Path, name: str, pixels: np.ndarray, seconds: float, repeats: int) -> None:
    print("\n| batch | callers | no cache rows/s | all hits rows/s | all misses rows/s | hits | misses |")
    print("|---|---|---|---|---|---|---|")
    with server(repo, None) as plain, server(repo, None, "--cache-mb", "256") as cached:
        for batch, concurrency in CELLS:
            request = vae_pb2.EncodeRequest(model=name, inputs=to_tensor(pixels[:batch]))
            runs: dict[str, list[dict]] = {"none": [], "hits": [], "misses": []}
            counts = {"hits": [0.0, 0.0], "misses": [0.0, 0.0]}  # (hits, misses) the server counted
            for repeat in range(repeats):
                runs["none"].append(run_load(plain.target, request, concurrency, seconds))
                # More requests than the run makes, from rows no other run sent: every key new
                distinct = int(runs["none"][-1]["calls_per_s"] * seconds * 2) + 100
                fresh = pixels[batch * (repeat + 1) : batch * (repeat + 2)]
                fresh_request = vae_pb2.EncodeRequest(model=name, inputs=to_tensor(fresh))
                for kind, sent, count in (("hits", request, 1), ("misses", fresh_request, distinct)):
                    before = [counted(cached, f"vaeserve_cache_{k}_total") for k in ("hits", "misses")]
                    runs[kind].append(run_load(cached.target, sent, concurrency, seconds, distinct=count))
                    after = [counted(cached, f"vaeserve_cache_{k}_total") for k in ("hits", "misses")]
                    counts[kind] = [c + a - b for c, a, b in zip(counts[kind], after, before)]
            none, hits, misses = (median_cell(runs[k])["rows_per_s"] for k in ("none", "hits", "misses"))
            print(
                f"| {batch:,} | {concurrency} | {none:,.0f} | {hits:,.0f} | {misses:,.0f} "
                f"| {hits / none:.2f} | {misses / none:.2f} |",
                flush=True,
            )
            # Only a hits run's first call may miss (when no run before made it)
            for kind, (hit, miss) in counts.items():
                if (miss if kind == "hits" else hit) > repeats:
                    raise RuntimeError(f"the {kind} runs were not {kind}: {hit:.0f} hits, {miss:.0f} misses")


def shadow(version: Path, name: str, pixels: np.ndarray, seconds: float, repeats: int, work: Path) -> None:
    repos = {}
    for setup, split in (("routed", TrafficSplit({"1": 100})), ("shadowed", TrafficSplit({"1": 100}, "2"))):
        repos[setup] = work / setup
        for number in (1, 2):
            copy_version(version, repos[setup], name, number)
        set_model_traffic(repos[setup], name, split)
    print("\n| batch | callers | routed rows/s | p50 ms | p99 ms | with shadow rows/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    mirrored = dropped = 0.0
    with server(repos["routed"], None) as routed, server(repos["shadowed"], None) as shadowed:
        for batch, concurrency in CELLS:
            request = vae_pb2.EncodeRequest(model=name, inputs=to_tensor(pixels[:batch]))
            runs: dict[str, list[dict]] = {"routed": [], "shadowed": []}
            for _ in range(repeats):
                runs["routed"].append(run_load(routed.target, request, concurrency, seconds))
                runs["shadowed"].append(run_load(shadowed.target, request, concurrency, seconds))
            cells = [median_cell(runs[k]) for k in ("routed", "shadowed")]
            figures = " | ".join(
                f"{c['rows_per_s']:,.0f} | {c['p50_ms']:.2f} | {c['p99_ms']:.2f}" for c in cells
            )
            print(f"| {batch:,} | {concurrency} | {figures} |", flush=True)
        mirrored = counted(shadowed, "vaeserve_shadow_calls_total", outcome="answered")
        dropped = counted(shadowed, "vaeserve_shadow_calls_total", outcome="dropped")
        compared = counted(shadowed, "vaeserve_shadow_max_abs_difference_count")
        difference = counted(shadowed, "vaeserve_shadow_max_abs_difference_sum") / max(compared, 1)
    print(
        f"\nshadow calls answered {mirrored:,.0f}, dropped (16 in flight already) {dropped:,.0f}; "
        f"mean largest |shadow - routed| {difference:g} (version 2 is a copy of 1)"
    )


def residency(version: Path, pixels: np.ndarray, calls: int, work: Path) -> None:
    names = ("a", "b", "c")
    repo = work / "three"
    for name in names:
        copy_version(version, repo, name, 1)
    rows = pixels[:1]
    print("\n| server | calls | p50 ms | p99 ms | models loaded (max seen) |\n|---|---|---|---|---|")
    with server(repo, None) as every, server(repo, None, "--max-loaded-models", "2") as bounded:
        for label, served in (("all three loaded", every), ("--max-loaded-models 2", bounded)):
            latencies, most = [], 0.0
            clients = [VaeClient(served.target, model=name, timeout=30) for name in names]
            for call in range(calls):
                started = time.perf_counter()
                clients[call % 3].encode(rows)
                latencies.append(1000 * (time.perf_counter() - started))
                if call % 10 == 0:
                    most = max(most, counted(served, "vaeserve_models_loaded"))
            for client in clients:
                client.close()
            p50, p99 = np.percentile(latencies, (50, 99))
            print(f"| {label} | {calls} | {p50:.2f} | {p99:.2f} | {most:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="models/NAME/VERSION")
    parser.add_argument("--data-dir", type=Path, help="folder of the MNIST IDX files")
    parser.add_argument("--seconds", type=float, default=2.0, help="each load run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each server per cell; the median")
    parser.add_argument("--calls", type=int, default=300, help="calls of the residency rotation")
    parser.add_argument(
        "--skip", default="", help="sections to skip, comma-separated: cache, shadow, residency"
    )
    args = parser.parse_args()
    version = open_path(args.model)
    pixels = load_dataset(version.manifest.dataset, args.data_dir, progress=False).test_images
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        if "cache" not in args.skip:
            cache(version.path.parent.parent, version.name, pixels, args.seconds, args.repeats)
        if "shadow" not in args.skip:
            shadow(version.path, version.name, pixels, args.seconds, args.repeats, Path(work))
        if "residency" not in args.skip:
            residency(version.path, pixels, args.calls, Path(work))
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
