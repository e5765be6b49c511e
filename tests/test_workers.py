"""`vae serve --workers N`: worker processes on one port, supervised (the real server)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import servers
from test_cli import assert_one_line_error, vae

from vaeserve.client import VaeClient
from vaeserve.datasets import model_inputs
from vaeserve.h2load import calls_by_code
from vaeserve.repository import file_record, resolve
from vaeserve.runtime import OnnxPair


def test_workers_serve_one_port_with_one_metrics_page(repo: Path, tmp_path: Path, mnist) -> None:
    server = servers.start(repo, tmp_path / "serve.log", "--workers", "2")
    pids = server.worker_pids()
    x = model_inputs(mnist.test_images[:200], "threshold")
    mean, stddev = OnnxPair.load(resolve(repo, "tiny")).encode(x)

    def encode(_: int) -> list[dict[str, np.ndarray]]:
        with VaeClient(server.target) as client:
            return [client.encode(x) for _ in range(5)]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = [r for batch in pool.map(encode, range(4)) for r in batch]
    for result in results:
        np.testing.assert_allclose(result["mean"], mean, atol=1e-6)
        np.testing.assert_allclose(result["stddev"], stddev, atol=1e-6)
    assert calls_by_code(server.metrics_port)["OK"] >= len(results)  # summed over the workers
    # Every worker serves OIP's REST API on the one HTTP port too (a connection per call).
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x[:3].shape), "data": x[:3].tolist()}]}
    url = f"http://{server.http}/v2/models/tiny-encoder/infer"
    for _ in range(8):
        answer = json.load(
            urllib.request.urlopen(urllib.request.Request(url, json.dumps(body).encode()), timeout=30)
        )
        np.testing.assert_allclose(np.reshape(answer["outputs"][0]["data"], (3, -1)), mean[:3], atol=1e-6)
    assert calls_by_code(server.metrics_port)["200"] >= 8
    assert server.output().count(f"OIP HTTP on :{server.http_port}") == 2  # one line per worker
    assert server.stop() == 0, server.output()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()
    log = server.output()
    assert "[worker 1/2]: stopped" in log and "[worker 2/2]: stopped" in log


def test_a_worker_killed_under_load_is_restarted_without_a_failed_call(
    repo: Path, tmp_path: Path, mnist
) -> None:
    server = servers.start(repo, tmp_path / "serve.log", "--workers", "2")
    try:
        first, second = server.worker_pids()
        pixels = mnist.test_images[:16]
        failures: list[BaseException] = []
        answered = [0]
        stop = threading.Event()

        def caller() -> None:
            # Each caller a connection of its own, retries on (the client's default policy).
            with VaeClient(server.target, timeout=20) as client:
                while not stop.is_set():
                    try:
                        assert client.encode(pixels)["mean"].shape == (16, 8)
                        answered[0] += 1
                    except BaseException as exc:
                        failures.append(exc)
                        return

        threads = [threading.Thread(target=caller) for _ in range(4)]
        for thread in threads:
            thread.start()
        while answered[0] < 40 and not failures:
            time.sleep(0.05)
        killed = time.monotonic()
        os.kill(first, signal.SIGKILL)
        while "restarted, pid" not in server.output() and time.monotonic() < killed + 10:
            time.sleep(0.05)
        restarted = int(re.search(r"vae-serve-1 restarted, pid (\d+)", server.output()).group(1))
        while server.output().count("all 2 workers serving") < 2 and time.monotonic() < killed + 10:
            time.sleep(0.05)
        assert time.monotonic() - killed < 10  # back and serving within 10 s
        before = answered[0]
        while answered[0] < before + 40 and not failures:
            time.sleep(0.05)
        stop.set()
        for thread in threads:
            thread.join(60)
        assert not failures, failures[0]
        assert server.process.poll() is None  # the supervisor did not exit
        assert Path(f"/proc/{second}").exists() and Path(f"/proc/{restarted}").exists()
        assert f"vae-serve-1 (pid {first}) exited with -{signal.SIGKILL.value}; restarting" in server.output()
        page = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read()
        assert b"vaeserve_worker_restarts_total 1.0" in page
    finally:
        assert server.stop() == 0, server.output()


def test_a_worker_that_keeps_dying_stops_the_service(repo: Path, tmp_path: Path) -> None:
    server = servers.start(repo, tmp_path / "serve.log", "--workers", "2")
    first, second = server.worker_pids()
    os.kill(first, signal.SIGKILL)
    for restart in range(1, 5):  # each new worker of slot 1 killed once it is up
        deadline = time.monotonic() + 30
        while len(re.findall(r"vae-serve-1 restarted, pid (\d+)", server.output())) < restart:
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.05)
        pid = int(re.findall(r"vae-serve-1 restarted, pid (\d+)", server.output())[-1])
        os.kill(pid, signal.SIGKILL)
    assert server.process.wait(60) == 1
    assert "exited with -9 (5 times in 60 s); stopping the others" in server.output()
    assert not Path(f"/proc/{second}").exists()


def test_a_worker_that_fails_its_first_start_stops_the_service(repo: Path, tmp_path: Path) -> None:
    """A version that passes the supervisor's check (its manifest lists the files as they are)
    but that onnxruntime cannot open: every worker fails to start."""
    broken = tmp_path / "models"
    shutil.copytree(repo, broken)
    version = broken / "tiny" / "1"
    (version / "encoder.onnx").write_bytes(b"not an onnx graph")
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["graphs"]["encoder"].update(file_record(version / "encoder.onnx").to_dict())
    (version / "manifest.json").write_text(json.dumps(manifest))
    port = str(servers.free_port())
    result = vae("serve", "--repo", str(broken), "--workers", "2", "--port", port, "--http-port", "0")
    assert result.returncode == 1
    assert "before it ever served; stopping the others" in result.stderr


def test_a_stray_second_server_on_the_same_port_is_refused(repo: Path, tmp_path: Path) -> None:
    with servers.running(repo, tmp_path / "serve.log", "--workers", "1") as first:
        port = first.target.rpartition(":")[2]
        second = vae("serve", "--repo", str(repo), "--host", "127.0.0.1", "--port", port, "--http-port", "0")
        assert_one_line_error(second, 1, f"--port {port}", "another server already listens there")
        assert VaeClient(first.target).health() == "SERVING"


def test_a_fresh_supervisor_sweeps_folders_its_dead_predecessors_left(tmp_path: Path) -> None:
    from vaeserve.service.workers import sweep_leftovers

    gone = subprocess.Popen(["true"])
    gone.wait()
    left = [tmp_path / f"vaeserve-metrics-{gone.pid}-x1", tmp_path / f"vaeserve-control-{gone.pid}-x2"]
    ours = tmp_path / f"vaeserve-metrics-{os.getpid()}-x3"
    for folder in (*left, ours):
        folder.mkdir()
        (folder / "counter_1.db").write_bytes(b"\0")
    sweep_leftovers(tmp_path)
    assert not any(folder.exists() for folder in left) and ours.exists()


def test_workers_need_a_fixed_port() -> None:
    assert_one_line_error(vae("serve", "--workers", "2", "--port", "0"), 1, "--workers 2", "fixed --port")
    assert_one_line_error(vae("serve", "--workers", "-1"), 1, "--workers -1", "one per core")


def test_workers_default_to_one_per_usable_core() -> None:
    from vaeserve.runtime import usable_cores
    from vaeserve.service.settings import MAX_AUTO_WORKERS, ServeSettings

    assert ServeSettings().workers == 0  # the default: decided at start
    assert ServeSettings().with_workers().workers == min(usable_cores(), MAX_AUTO_WORKERS)
    assert ServeSettings(port=0).with_workers().workers == 1  # each worker would get its own port
    assert ServeSettings(workers=3).with_workers().workers == 3


@pytest.mark.parametrize(
    ("cpu_max", "quota"), [("150000 100000\n", 1.5), ("max 100000\n", None), ("garbage", None)]
)
def test_a_container_cpu_quota_narrows_the_usable_cores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpu_max: str, quota: float | None
) -> None:
    from vaeserve import runtime

    (tmp_path / "cpu.max").write_text(cpu_max)
    monkeypatch.setattr(runtime, "CGROUP_V2", tmp_path / "cpu.max")
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    assert runtime.cgroup_cpu_quota() == quota
    assert runtime.usable_cores() == (2 if quota else 4)  # 1.5 CPUs of time: two threads, not four


@pytest.mark.parametrize("workers", ["1", "3"])
def test_each_worker_may_use_every_core(workers: str) -> None:
    from vaeserve.runtime import usable_cores
    from vaeserve.service.settings import ServeSettings
    from vaeserve.service.workers import worker_settings

    each = worker_settings(ServeSettings(workers=int(workers), metrics_port=9464))
    assert each.workers == 1 and each.metrics_port == 0
    assert each.threads == usable_cores()  # a lone large call uses them all


def test_workers_do_not_outlive_a_sigkilled_supervisor(repo: Path, tmp_path: Path) -> None:
    server = servers.start(repo, tmp_path / "serve.log", "--workers", "2")
    pids = server.worker_pids()
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(10)
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)  # they drained and exited
