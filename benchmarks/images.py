"""The images as a user meets them: build times from an empty cache and after a code change,
sizes, and the time from `docker run` to SERVING (as a client sees it) and to healthy (as the
image's HEALTHCHECK, every 10 s, reports it).

    python -m benchmarks.images --repo models          # needs a Docker engine (make engine)

From an empty cache: each image built alone without Docker's layer cache (NO_CACHE=1), as a
user building only that target would; the classic builder builds every stage before the target,
so the CUDA image's time is that of all three (the base image is kept: docker/debian-base.sh
prints its own time when it makes one). After a code change: scripts/images.sh, from the cache,
in a copy of the build context with one line added to service/server.py (the images are rebuilt
from the real tree afterwards). Prints a markdown table for docs/deployment.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.service_throughput import free_port
from vaeserve.client import VaeClient

ROOT = Path(__file__).resolve().parents[1]
IMAGES = {"service": "vaeserve", "train": "vaeserve-train", "cuda": "vaeserve-cuda"}
BUILT = re.compile(r"^built (\S+):latest .* in (\d+) s, (\d+) MB$", re.M)


def build(tree: Path, **env: str) -> dict[str, tuple[int, int]]:
    """scripts/images.sh in ``tree``: seconds and MB per image, from its own report."""
    script = [str(tree / "scripts" / "images.sh")]
    done = subprocess.run(script, capture_output=True, text=True, check=True, env={**os.environ, **env})
    return {name: (int(seconds), int(size)) for name, seconds, size in BUILT.findall(done.stdout)}


def build_cold() -> dict[str, tuple[int, int]]:
    return {name: build(ROOT, NO_CACHE="1", IMAGES=key)[name] for key, name in IMAGES.items()}


def changed_copy(folder: Path) -> Path:
    """The build context as git and make images have it, with one line of service code changed."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    for name in [
        *files.stdout.split(),
        *(str(p.relative_to(ROOT)) for p in (ROOT / "docker/local").rglob("*")),
    ]:
        source, target = ROOT / name, folder / name
        if source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    with open(folder / "service" / "server.py", "a") as handle:
        handle.write("# a code change\n")
    return folder


def time_to_ready(image: str, repo: Path) -> tuple[float, float]:
    """Seconds from `docker run` to SERVING on the published port, and to Docker's healthy."""
    port = free_port()
    name = f"vaeserve-bench-{port}"
    command = ["docker", "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:50051"]
    command += ["-v", f"{repo.resolve()}:/models:ro", image]
    started = time.monotonic()
    subprocess.run(command, capture_output=True, check=True)
    try:
        with VaeClient(f"127.0.0.1:{port}", timeout=2) as client:
            while not client.wait_until_serving(0.05):
                pass
        serving = time.monotonic() - started
        while _health(name) != "healthy":
            time.sleep(0.1)
        return serving, time.monotonic() - started
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


def _health(name: str) -> str:
    inspect = ["docker", "inspect", "-f", "{{.State.Health.Status}}", name]
    return subprocess.run(inspect, capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, required=True, help="a model repository to serve")
    args = parser.parse_args()
    cold = build_cold()
    with tempfile.TemporaryDirectory() as folder:
        warm = build(changed_copy(Path(folder)))
    build(ROOT)
    ready = {key: time_to_ready(f"{IMAGES[key]}:latest", args.repo) for key in ("service", "cuda")}
    print("| image | size | build, empty cache | build after a code change | to SERVING | to healthy |")
    print("|---|---|---|---|---|---|")
    for key, name in IMAGES.items():
        to_serving, to_healthy = (f"{s:.1f} s" for s in ready[key]) if key in ready else ("", "")
        size, built, rebuilt = cold[name][1], cold[name][0], warm[name][0]
        print(f"| {name} | {size:,} MB | {built} s | {rebuilt} s | {to_serving} | {to_healthy} |")


if __name__ == "__main__":
    main()
