"""Exports any user can serve: versions get the modes of ordinary new files (the umask), and a
server running as another uid serves a repository root exported, or says in one line which path
it may not read and how to fix it, then serves the version once it is made readable."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import servers
from test_live import POLL, publish, served_version, until

from vaeserve.client import VaeClient
from vaeserve.datasets import model_inputs
from vaeserve.export.exporter import ExportRequest, export_model
from vaeserve.runtime import OnnxPair

NOBODY = 65534


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, int]:
    """Permission bits of every file and folder below ``root``, by relative path."""
    paths = [root, *root.rglob("*")]
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in paths}


def export_tiny(tiny_run: Path, repo: Path, mnist_dir: Path, mask: int, version: int | None = None) -> Path:
    with umask(mask):
        request = ExportRequest(tiny_run, repo, "tiny", version=version, iw_samples=2, data_dir=mnist_dir)
        return export_model(request).path


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder another uid can reach (pytest's own temporary folders are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="vaeserve-permissions-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def other_uid() -> int:
    """An unprivileged uid this test can run programs as: needs root and setpriv."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("serving as another uid needs root and setpriv")
    probe = [*servers.as_user(NOBODY), sys.executable, "-c", "import vaeserve.service"]
    found = subprocess.run(probe, capture_output=True, text=True, cwd="/")
    if found.returncode:
        pytest.skip(f"uid {NOBODY} cannot run this Python: {found.stderr.strip().splitlines()[-1]}")
    return NOBODY


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_an_export_has_the_modes_the_umask_gives(tiny_run: Path, mnist_dir: Path, tmp_path: Path, mask: int):
    version = export_tiny(tiny_run, tmp_path / "models", mnist_dir, mask)
    found = modes(version)
    assert found["."] == 0o777 & ~mask
    assert {name: mode for name, mode in found.items() if name != "."} == {
        name: 0o666 & ~mask for name in ("manifest.json", "encoder.onnx", "decoder.onnx")
    }
    assert not [p for p in version.parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_checkpoints_and_labels_have_the_modes_the_umask_gives(tiny_run: Path, repo: Path, tmp_path: Path):
    from vaeserve.remote_repository import set_model_labels

    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tiny_run / "checkpoint.pt").stat().st_mode) == 0o666 & ~mask
    target = tmp_path / "tiny"
    with umask(0o022):
        set_model_labels(tmp_path, "tiny", {"stable": 1})
    assert stat.S_IMODE((target / "labels.json").stat().st_mode) == 0o644


def test_another_uid_serves_a_repository_exported_by_root(
    other_uid: int, tiny_run: Path, mnist_dir: Path, mnist, open_dir: Path, tmp_path: Path
):
    version = export_tiny(tiny_run, open_dir / "models", mnist_dir, 0o022)
    x = model_inputs(mnist.test_images[:16], "threshold")
    with (
        servers.running(
            open_dir / "models", tmp_path / "serve.log", "--workers", "1", user=other_uid
        ) as server,
        VaeClient(server.target) as client,
    ):
        mean = client.encode(x)["mean"]
    expected, _ = OnnxPair(version / "encoder.onnx", version / "decoder.onnx").encode(x)
    np.testing.assert_allclose(mean, expected, rtol=1e-5, atol=1e-6)
    assert "Traceback" not in server.output()


def test_an_unreadable_version_is_one_log_line_and_served_once_readable(
    other_uid: int, tiny_run: Path, mnist_dir: Path, open_dir: Path, tmp_path: Path
):
    repo = open_dir / "models"
    first = export_tiny(tiny_run, repo, mnist_dir, 0o022)
    flags = ("--workers", "1", "--poll-s", POLL)
    with servers.running(repo, tmp_path / "serve.log", *flags, user=other_uid) as server:
        with umask(0o077):  # as a private export would be
            publish(repo, first, 2)
        (repo / "tiny" / "2").chmod(0o700)
        refusal = f"{repo}/tiny/2/manifest.json: permission denied to uid {other_uid}"
        until(lambda: refusal in server.output())
        for _ in range(10):  # polls go on; the refusal is not repeated
            assert served_version(server.target) == 1
        subprocess.run(["chmod", "-R", "a+rX", str(repo)], check=True)
        until(lambda: served_version(server.target) == 2)
        log = server.output()
    assert log.count(refusal) == 1, log
    assert "chmod -R a+rX" in log and "Traceback" not in log
