"""`vae embed` on a million rows from and to object storage, beside the same from local disk.

    python -m benchmarks.object_storage --model models/mnist/1 --data-dir ../shared/data/mnist

Starts a real S3-compatible store (SeaweedFS, vaeserve.sandbox) and a Ray cluster of `ray start`
nodes on this machine, builds a Parquet input of ``--rows`` MNIST images (the 70,000 tiled) and
puts it on the store, then times whole `vae embed` commands (start-up included), each once:
the local engine, the service (`--server`, a `vae serve --workers 1`), and Ray with one and two
worker nodes of one CPU each; every one from local disk to local disk and from the store to the
store. Every output is compared with the local engine's. Alongside: the machine's CPU busy
share during each run (the store, the server and Ray's processes share the two cores), the
store's single-stream bandwidth, and Ray's per-task overhead, the figures the docs' 100-node
estimate is made from.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from vaeserve.datasets import load_dataset
from vaeserve.remote_repository import upload_version
from vaeserve.repository import open_path
from vaeserve.sandbox import start_cluster, start_seaweedfs
from vaeserve.storage import location

ROW_GROUP = 65536


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def write_input(path: Path, rows: int, data_dir: Path | None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    dataset = load_dataset("mnist", data_dir=data_dir)
    images = np.concatenate([dataset.train_images, dataset.test_images])
    schema = pa.schema([pa.field("pixels", pa.list_(pa.uint8(), 784))])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, ROW_GROUP):
            count = min(ROW_GROUP, rows - start)
            block = images[np.arange(start, start + count) % len(images)]
            column = pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), 784)
            writer.write_table(pa.table({"pixels": column}, schema=schema), row_group_size=ROW_GROUP)


def timed_embed(args: list[str], env: dict[str, str]) -> dict:
    command = [sys.executable, "-m", "vaeserve.cli", "embed", "--no-progress", *args]
    busy, total = cpu_times()
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr}")
    busy_after, total_after = cpu_times()
    return {"seconds": seconds, "cpu_busy": (busy_after - busy) / max(total_after - total, 1)}


def read_means(target: str) -> np.ndarray:
    import pyarrow.parquet as pq

    where = location(target)
    local = isinstance(where, Path)
    table = pq.read_table(where) if local else pq.read_table(where.key, filesystem=where.fs)
    return np.stack(table.column("mean").to_numpy(zero_copy_only=False))


def store_bandwidth(bucket: str, megabytes: int = 256) -> dict:
    data = np.random.default_rng(0).bytes(megabytes << 20)
    target = location(f"{bucket}/bandwidth")
    started = time.perf_counter()
    target.put(data)
    put_s = time.perf_counter() - started
    started = time.perf_counter()
    back = target.read_bytes()
    get_s = time.perf_counter() - started
    assert back == data
    target.unlink()
    return {"put_MBps": megabytes / put_s, "get_MBps": megabytes / get_s}


OVERHEAD = """
import json, sys, time
import ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
noop = ray.remote(num_cpus=1)(lambda: None)
ray.get(noop.remote())
started = time.perf_counter()
for _ in range(100):
    ray.get(noop.remote())
serial = (time.perf_counter() - started) / 100
started = time.perf_counter()
ray.get([noop.remote() for _ in range(400)])
pipelined = (time.perf_counter() - started) / 400
print(json.dumps({"serial_ms": serial * 1e3, "pipelined_ms": pipelined * 1e3}))
"""


def ray_task_overhead(cluster) -> dict:
    """Milliseconds per no-op task: one at a time (latency), and 400 in flight (the rate a
    driver gets tasks through), measured by a driver of its own."""
    command = [sys.executable, "-c", OVERHEAD, cluster.address]
    result = subprocess.run(command, capture_output=True, text=True, env=cluster.env, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def start_server(repo: Path, env: dict[str, str], folder: Path) -> tuple[subprocess.Popen, str]:
    from vaeserve.client import VaeClient
    from vaeserve.sandbox import free_port

    port = free_port()
    command = [sys.executable, "-m", "vaeserve.cli", "serve", "--repo", str(repo), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--http-port", "0", "--metrics-port", "0", "--workers", "1"]
    log = open(folder / "serve.log", "w")  # noqa: SIM115 - the server writes to it for its whole life
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    with VaeClient(f"127.0.0.1:{port}", timeout=2) as client:
        if not client.wait_until_serving(120):
            raise RuntimeError((folder / "serve.log").read_text())
    return process, f"127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="models/NAME/VERSION")
    parser.add_argument("--data-dir", type=Path, help="folder of the MNIST IDX files")
    parser.add_argument("--rows", type=int, default=1_050_000, help="rows of the input (default 1,050,000)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    version = open_path(args.model)
    work = Path(tempfile.mkdtemp(prefix="vaeserve-bench-store-"))
    store = start_seaweedfs(work / "seaweedfs")
    env = {**os.environ, **store.env, "VAESERVE_CACHE_DIR": str(work / "cache")}
    os.environ.update(env)
    cluster = None
    server = None
    results: dict = {"rows": args.rows}
    try:
        bucket = store.create_bucket("bench")
        local_input = work / "x.parquet"
        write_input(local_input, args.rows, args.data_dir)
        results["input_MB"] = local_input.stat().st_size / 1e6
        started = time.perf_counter()
        location(f"{bucket}/in/x.parquet").upload(local_input)
        results["upload_s"] = time.perf_counter() - started
        upload_version(version, location(f"{bucket}/models"))
        results["store"] = store_bandwidth(bucket)
        remote_model = f"{bucket}/models/{version.name}/{version.version}"
        places = {
            "disk": (str(args.model), str(local_input), lambda name: str(work / "out" / f"{name}.parquet")),
            "store": (remote_model, f"{bucket}/in/x.parquet", lambda name: f"{bucket}/out/{name}.parquet"),
        }
        server, target = start_server(args.model.parent.parent, env, work)
        cluster = start_cluster(
            work / "ray", store.env | {"VAESERVE_CACHE_DIR": str(work / "cache")}, workers=1
        )
        engines = {
            "local": [],
            "service": ["--server", target],
            "ray, 1 worker node": ["--engine", "ray", "--ray-address", cluster.address, "--workers", "1"],
        }
        reference = None
        rows = []
        for engine, flags in [*engines.items(), ("ray, 2 worker nodes", None)]:
            if flags is None:
                cluster.start_node(1)
                flags = ["--engine", "ray", "--ray-address", cluster.address, "--workers", "2"]
            for place, (model, source, output_of) in places.items():
                name = f"{engine.split(',')[0]}-{engine[-14:-13] if 'ray' in engine else ''}-{place}"
                output = output_of(name)
                run_env = cluster.env if "ray" in engine else env
                figures = timed_embed(
                    ["--model", model, "--input", source, "--output", output, *flags], run_env
                )
                means = read_means(output)
                if reference is None:
                    reference = means
                figures.update(engine=engine, place=place, rows_per_s=args.rows / figures["seconds"])
                figures["equal_to_local"] = bool(np.array_equal(means, reference))
                rows.append(figures)
                print(json.dumps(figures), flush=True)
        # One task per row group: a task reading a chunk decodes its whole row group, so with
        # 8,192-row chunks in 65,536-row groups Ray reads the input eight times over.
        model, source, output_of = places["store"]
        flags = ["--engine", "ray", "--ray-address", cluster.address, "--workers", "2"]
        job = ["--model", model, "--input", source, "--output", output_of("ray-2-groups"), *flags]
        figures = timed_embed([*job, "--chunk-rows", str(ROW_GROUP)], cluster.env)
        figures.update(engine=f"ray, 2 worker nodes, --chunk-rows {ROW_GROUP:,}", place="store")
        figures.update(rows_per_s=args.rows / figures["seconds"])
        figures["equal_to_local"] = bool(np.array_equal(read_means(output_of("ray-2-groups")), reference))
        rows.append(figures)
        print(json.dumps(figures), flush=True)
        results["runs"] = rows
        results["ray_task"] = ray_task_overhead(cluster)
    finally:
        if cluster is not None:
            cluster.stop()
        if server is not None:
            server.terminate()
            server.wait(60)
        store.stop()
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)


def print_table(results: dict) -> None:
    print("\n| engine | from/to | rows/s | seconds | CPU busy | equal |")
    print("|---|---|---|---|---|---|")
    for run in results["runs"]:
        print(
            f"| {run['engine']} | {run['place']} | {run['rows_per_s']:,.0f} | {run['seconds']:.1f} | "
            f"{run['cpu_busy']:.0%} | {'yes' if run['equal_to_local'] else 'NO'} |"
        )


if __name__ == "__main__":
    main()
