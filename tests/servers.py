"""Start the real `vae serve` as a subprocess on 127.0.0.1 and wait until it reports SERVING."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from vaeserve.client import VaeClient
from vaeserve.service.metrics import sample_total

# Every test server runs with torch unimportable: the service must never need it.
WITHOUT_TORCH = (
    "import sys; sys.modules['torch'] = None\nfrom vaeserve.cli import main\nsys.exit(main(sys.argv[1:]))"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_user(uid: int | None) -> list[str]:
    """The command prefix that runs a program as ``uid`` (and the same gid), no other groups."""
    if uid is None:
        return []
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]


@dataclass
class Server:
    target: str
    metrics_port: int
    process: subprocess.Popen
    log: Path
    http_port: int = 0

    @property
    def host(self) -> str:
        return self.target.rpartition(":")[0]

    @property
    def http(self) -> str:
        """The OIP HTTP/REST endpoint, host:port."""
        return f"{self.host}:{self.http_port}"

    def metrics(self) -> str:
        """The Prometheus page."""
        url = f"http://{self.host}:{self.metrics_port}/metrics"
        return urllib.request.urlopen(url, timeout=10).read().decode()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)

    def output(self) -> str:
        return self.log.read_text()

    def worker_pids(self) -> list[int]:
        """The live workers' pids in slot order, as the supervisor logged them: at start, then
        "worker vae-serve-N restarted, pid P" for each restart."""
        log = self.output()
        started = re.search(r"supervising \d+ workers .*?pids ([\d, ]+)", log)
        if started is None:
            raise AssertionError(f"the server supervises no workers:\n{log}")
        pids = [int(pid) for pid in started.group(1).split(", ")]
        for slot, pid in re.findall(r"worker vae-serve-(\d+) restarted, pid (\d+)", log):
            pids[int(slot) - 1] = int(pid)
        return pids


def start(
    repo: Path,
    log: Path,
    *flags: str,
    env: dict[str, str] | None = None,
    client: dict | None = None,
    use_flags: bool = True,
    port: int | None = None,
    host: str = "127.0.0.1",
    user: int | None = None,
) -> Server:
    """``user``: run the server as that uid and gid (root only), as an image or a pod would."""
    port, metrics_port, http_port = port or free_port(), free_port(), free_port()
    command = [*as_user(user), sys.executable, "-c", WITHOUT_TORCH, "serve"]
    if use_flags:
        command += [
            "--repo",
            str(repo),
            "--host",
            host,
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
            "--http-port",
            str(http_port),
            *flags,
        ]
    environment = {**os.environ, **(env or {})}
    if not use_flags:
        environment.update(
            VAESERVE_REPO=str(repo),
            VAESERVE_HOST="127.0.0.1",
            VAESERVE_PORT=str(port),
            VAESERVE_METRICS_PORT=str(metrics_port),
            VAESERVE_HTTP_PORT=str(http_port),
        )
    handle = open(log, "w")  # noqa: SIM115 - the server writes to it for its whole life
    process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=environment)
    server = Server(f"{host}:{port}", metrics_port, process, log, http_port)
    wait_serving(server, client or {})
    return server


def wait_serving(server: Server, client_options: dict, timeout: float = 60) -> None:
    """Until the server answers SERVING and, when it supervises workers, until every one of them
    serves: the first worker up answers health for the port, and a test that made its calls and
    stopped before the others started would find only that one in the log."""
    deadline = time.monotonic() + timeout
    with VaeClient(server.target, timeout=2, **client_options) as client:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{server.output()}")
            if client.wait_until_serving(0.5):
                break
        else:
            server.stop()
            raise RuntimeError(f"server not SERVING after {timeout} s:\n{server.output()}")
    supervised = re.search(r"supervising (\d+) workers", server.output())
    if supervised:
        every = f"all {supervised.group(1)} workers serving"
        try:
            until(lambda: every in server.output(), timeout=max(deadline - time.monotonic(), 1), what=every)
        except AssertionError:
            server.stop()
            raise RuntimeError(f"not {every} after {timeout} s:\n{server.output()}") from None


@contextlib.contextmanager
def running(repo: Path, log: Path, *flags: str, **options) -> Iterator[Server]:
    server = start(repo, log, *flags, **options)
    try:
        yield server
    finally:
        server.stop()


def raw_status(call, request) -> tuple[grpc.StatusCode, str]:
    """Make one call with a raw stub; its status code and details (OK and "" on success)."""
    try:
        call(request, timeout=30)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def until(check: Callable[[], object], timeout: float = 30, what: str = "the condition") -> object:
    """Wait on a condition, never on a clock: ``check()``'s first true result, or an
    AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"{what} did not hold within {timeout} s")


def add_model(repo: Path, source: str, name: str, staging: Path) -> None:
    """A second model in ``repo``: ``source``'s versions under ``name`` (their manifests renamed
    to match), moved in whole as `vae export` publishes, so a poll never sees it half-copied."""
    shutil.copytree(repo / source, staging / name)
    for manifest in (staging / name).glob("*/manifest.json"):
        record = json.loads(manifest.read_text())
        manifest.write_text(json.dumps({**record, "name": name}, indent=2))
    (staging / name).rename(repo / name)


def metric(server: Server, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples on ``server``'s metrics page whose labels include ``labels``
    (0 when there are none)."""
    return sample_total(server.metrics(), name, **labels)
