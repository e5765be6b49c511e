"""`vae serve --poll-s` and `vae label`: versions and labels followed while the real server runs."""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import servers
from test_cli import assert_one_line_error, vae

from vaeserve._proto import vae_pb2, vae_pb2_grpc
from vaeserve.codec import to_tensor
from vaeserve.repository import copy_version, load_version
from vaeserve.runtime import OnnxPair
from vaeserve.service.dataplane import ServedModel
from vaeserve.service.metrics import Metrics
from vaeserve.service.settings import ServeSettings

POLL = "0.2"


def publish(repo: Path, source: Path, number: int) -> None:
    """A new version of tiny as an export publishes one: the same graphs, renamed into place."""
    copy_version(source, repo, "tiny", number)


def until(check: Callable[[], object], timeout: float = 30) -> object:
    return servers.until(check, timeout, "the server following the repository")


def served_version(target: str, version: str = "") -> int | grpc.StatusCode:
    """The version that answers an Encode naming ``version`` (a fresh connection each time)."""
    request = vae_pb2.EncodeRequest(inputs=to_tensor(np.zeros((1, 784), np.uint8)), version=version)
    with grpc.insecure_channel(target) as channel:
        try:
            return vae_pb2_grpc.VaeServiceStub(channel).Encode(request, timeout=10).model.version
        except grpc.RpcError as error:
            return error.code()


def events(server: servers.Server) -> dict[str, float]:
    page = (
        urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    )
    return {
        e: float(n) for e, n in re.findall(r'vaeserve_repository_events_total\{event="(\w+)"\} (\S+)', page)
    }


@pytest.fixture()
def live_repo(repo: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "models"
    shutil.copytree(repo, copy)
    return copy


def test_new_versions_labels_and_removals_are_followed(live_repo: Path, tmp_path: Path) -> None:
    one = live_repo / "tiny" / "1"
    with servers.running(live_repo, tmp_path / "serve.log", "--poll-s", POLL, "--workers", "1") as server:
        assert served_version(server.target) == 1
        publish(live_repo, one, 2)  # a new version: latest moves to it once it is loaded and warm
        until(lambda: served_version(server.target) == 2)
        assert served_version(server.target, "1") == 1  # both are served

        assert (
            vae("label", "--repo", str(live_repo), "--name", "tiny", "stable=1", "canary=2").returncode == 0
        )
        until(lambda: served_version(server.target, "stable") == 1)
        assert served_version(server.target, "canary") == 2
        rest = f"http://{server.http}/v2/models/tiny-encoder/versions/stable"
        assert json.loads(urllib.request.urlopen(rest, timeout=10).read())["name"] == "tiny-encoder"

        # A label pointing at a version that is not loaded is refused; the labels in effect stay.
        (live_repo / "tiny" / "labels.json").write_text(json.dumps({"stable": 9}))
        until(lambda: "refusing" in server.output() and "labels.json" in server.output())
        assert served_version(server.target, "stable") == 1

        # A removed version a label points at is kept; unlabelled, it is retired.
        shutil.rmtree(one)
        until(lambda: "a label points at it" in server.output())
        assert served_version(server.target, "1") == 1
        (live_repo / "tiny" / "labels.json").write_text(json.dumps({"canary": 2}))
        until(lambda: served_version(server.target, "1") == grpc.StatusCode.NOT_FOUND)
        assert served_version(server.target) == 2
        assert served_version(server.target, "stable") == grpc.StatusCode.NOT_FOUND  # the label is gone
        with pytest.raises(urllib.error.HTTPError) as gone:
            urllib.request.urlopen(f"http://{server.http}/v2/models/tiny-encoder/versions/1", timeout=10)
        assert gone.value.code == 404

        # The last version of a model is never retired, even when its folder goes.
        shutil.move(live_repo / "tiny" / "2", tmp_path / "away")
        until(lambda: "only loaded version" in server.output())
        assert served_version(server.target) == 2
        console = f"http://{server.http}/v2/console/models"
        (model,) = json.loads(urllib.request.urlopen(console, timeout=10).read())["models"]
        (kept,) = model["versions"]
        assert (model["name"], kept["version"], kept["state"]) == ("tiny", 2, "READY")
        assert kept["reason"] == "kept: its folder is gone"
        assert events(server) == {"loaded": 1.0, "retired": 1.0, "refused": 1.0}


def test_a_broken_version_is_refused_once_and_what_was_served_stays(live_repo: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(live_repo / "tiny" / "1", broken)
    (broken / "encoder.onnx").write_bytes(b"half a graph")  # its checksum no longer matches
    with servers.running(live_repo, tmp_path / "serve.log", "--poll-s", POLL, "--workers", "1") as server:
        publish(live_repo, broken, 3)
        until(lambda: events(server).get("refused"))
        time.sleep(1)  # several more polls: no second attempt, no second log line
        assert server.output().count("refusing") == 1 and "encoder.onnx" in server.output()
        assert (
            served_version(server.target) == 1
            and served_version(server.target, "3") == grpc.StatusCode.NOT_FOUND
        )
        shutil.rmtree(live_repo / "tiny" / "3")
        publish(live_repo, live_repo / "tiny" / "1", 3)  # the folder replaced whole: tried again
        until(lambda: served_version(server.target) == 3)


def test_every_worker_loads_a_new_version(live_repo: Path, tmp_path: Path) -> None:
    with servers.running(live_repo, tmp_path / "serve.log", "--poll-s", POLL, "--workers", "2") as server:
        publish(live_repo, live_repo / "tiny" / "1", 2)
        until(lambda: events(server).get("loaded") == 2.0)  # the supervisor sums both workers' counts
        assert {served_version(server.target) for _ in range(8)} == {2}


def test_label_command_errors_are_one_line(live_repo: Path) -> None:
    repo = str(live_repo)
    assert_one_line_error(vae("label", "--repo", repo, "--name", "tiny", "stable"), 1, "LABEL=VERSION")
    assert_one_line_error(vae("label", "--repo", repo, "--name", "tiny", "stable=4"), 1, "no version 4")
    assert_one_line_error(vae("label", "--repo", repo, "--name", "tiny", "latest=1"), 1, "not 'latest'")
    assert_one_line_error(vae("label", "--repo", repo, "--name", "nope", "a=1"), 1, "no versions")
    assert_one_line_error(vae("label", "--repo", repo, "--name", "tiny", "--remove", "x"), 1, "no such label")
    listed = vae("label", "--repo", repo, "--name", "tiny", "stable=1")
    assert listed.returncode == 0 and "tiny stable = 1" in listed.stdout
    assert json.loads((live_repo / "tiny" / "labels.json").read_text()) == {"stable": 1}
    assert not [p for p in (live_repo / "tiny").iterdir() if p.name.startswith(".tmp")]  # written whole


def test_a_version_folder_must_hold_its_own_export(live_repo: Path) -> None:
    from vaeserve.errors import RepositoryError
    from vaeserve.repository import load_version

    shutil.copytree(live_repo / "tiny" / "1", live_repo / "tiny" / "5")  # a copy, manifest unchanged
    with pytest.raises(RepositoryError, match="its manifest is tiny/1"):
        load_version(live_repo / "tiny" / "5")


class Load:
    """Callers sending Encode to ``latest`` (or a label) without retries, counting what answers."""

    def __init__(self, target: str, version: str = "", callers: int = 3) -> None:
        self.target, self.version = target, version
        self.failures: list[str] = []
        self.versions: list[int] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._call) for _ in range(callers)]

    def _call(self) -> None:
        request = vae_pb2.EncodeRequest(inputs=to_tensor(np.zeros((4, 784), np.uint8)), version=self.version)
        # A channel of each caller's own, and no retries: every failure is seen.
        with grpc.insecure_channel(self.target, options=[("grpc.enable_retries", 0)]) as channel:
            stub = vae_pb2_grpc.VaeServiceStub(channel)
            while not self.stop.is_set():
                try:
                    self.versions.append(stub.Encode(request, timeout=10).model.version)
                except grpc.RpcError as error:
                    self.failures.append(f"{error.code()}: {error.details()}")

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def now(self) -> int:
        """The version the latest answer came from."""
        until(lambda: self.versions)
        return self.versions[-1]


def test_a_served_version_is_freed_by_its_last_reference_not_by_the_garbage_collector(repo: Path) -> None:
    """A retired version's sessions go when its last call ends ("released"): nothing in a served
    model may refer back to it (a cycle waits for a full collection, which a steady server may not
    run for minutes: the takeover test below then saw no "released" line in 30 s)."""
    settings = ServeSettings()
    version = load_version(repo / "tiny" / "1")
    pair = OnnxPair.load(version, settings.device, 1, settings.variant)
    gc.disable()
    try:
        with ThreadPoolExecutor(1) as executor:
            served = ServedModel(version, pair, pair, settings, executor, Metrics())
            freed = weakref.ref(served)
            del served
            assert freed() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_new_version_takes_over_under_load_without_a_failed_call(
    live_repo: Path, tmp_path: Path, workers: str
) -> None:
    poll = 1.0
    assert vae("label", "--repo", str(live_repo), "--name", "tiny", "stable=1").returncode == 0
    flags = ("--poll-s", str(poll), "--workers", workers)
    with servers.running(live_repo, tmp_path / "serve.log", *flags) as server:
        with Load(server.target) as latest, Load(server.target, version="stable") as stable:
            assert latest.now() == 1 and stable.now() == 1
            broken = tmp_path / "tampered"
            shutil.copytree(live_repo / "tiny" / "1", broken)
            (broken / "decoder.onnx").write_bytes(b"tampered")
            publish(live_repo, broken, 3)  # refused; changes nothing
            until(lambda: "refusing" in server.output())
            assert latest.now() == 1
            shutil.rmtree(live_repo / "tiny" / "3")
            published = time.monotonic()
            publish(live_repo, live_repo / "tiny" / "1", 2)  # exported while 1 answers traffic
            until(lambda: latest.now() == 2)
            took = time.monotonic() - published
            assert vae("label", "--repo", str(live_repo), "--name", "tiny", "stable=2").returncode == 0
            until(lambda: stable.now() == 2)  # the label moved the traffic
            shutil.rmtree(live_repo / "tiny" / "1")  # the old version deleted
            until(lambda: "released tiny/1" in server.output())
            seen = len(latest.versions)
            until(lambda: len(latest.versions) > seen + 20)
        assert latest.failures == [] and stable.failures == []
        assert took <= 2 * poll, took  # the next poll, then loading and warming up the new version
        assert set(latest.versions[-20:]) == {2}


def overwrite_in_place(path: Path) -> None:
    """The same size, other bytes, the same inode: only the file's own times change."""
    with open(path, "r+b") as handle:
        handle.seek(path.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))


def answers(target: str, version: str = "", calls: int = 12) -> set:
    return {served_version(target, version) for _ in range(calls)}


def test_workers_agree_after_a_file_changes_in_place(live_repo: Path, tmp_path: Path) -> None:
    """Polling: a version whose encoder.onnx is overwritten in place (same size) is retired by
    every worker, a worker restarted afterwards included; latest answers v1 from all of them."""
    publish(live_repo, live_repo / "tiny" / "1", 2)
    flags = ("--poll-s", POLL, "--workers", "2", "--version", "all")
    with servers.running(live_repo, tmp_path / "serve.log", *flags) as server:
        assert answers(server.target) == {2}
        overwrite_in_place(live_repo / "tiny" / "2" / "encoder.onnx")
        os.kill(server.worker_pids()[0], 9)
        until(lambda: "restarted" in server.output() and server.output().count("all 2 workers serving") == 2)
        until(lambda: answers(server.target) == {1})
        assert answers(server.target, "2") == {grpc.StatusCode.NOT_FOUND}
        assert "its files changed on disk and no longer verify" in server.output()


def test_workers_without_polling_serve_what_the_supervisor_decided(live_repo: Path, tmp_path: Path) -> None:
    """No polling: a worker restarted after a new version appeared serves what the others do (the
    set decided at start); one restarted after a served file changed in place cannot, and says so,
    and the service stops rather than answer v2 from one worker and 404 from the other."""
    publish(live_repo, live_repo / "tiny" / "1", 2)
    flags = ("--workers", "2", "--version", "all")
    with servers.running(live_repo, tmp_path / "serve.log", *flags) as server:
        publish(live_repo, live_repo / "tiny" / "1", 3)
        os.kill(server.worker_pids()[0], 9)
        until(lambda: server.output().count("all 2 workers serving") == 2)
        assert answers(server.target) == {2} and answers(server.target, "3") == {grpc.StatusCode.NOT_FOUND}

        overwrite_in_place(live_repo / "tiny" / "2" / "encoder.onnx")
        os.kill(server.worker_pids()[0], 9)
        assert server.process.wait(60) == 1
    assert "tiny/2, which the other workers serve" in server.output()
    assert "Traceback" not in server.output()
