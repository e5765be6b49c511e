"""A full disk: every command that writes says so in one line, keeps what was complete, leaves
nothing half-written that looks complete, and a resumable job resumes once space is freed.
Each test writes to a small tmpfs it mounts (root only; skipped in one line elsewhere)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_cli import assert_one_line_error, vae


class SmallDisk:
    def __init__(self, path: Path) -> None:
        self.path = path

    def fill(self, leave_kib: int) -> None:
        """Take all but ``leave_kib`` KiB of the free space."""
        stat = os.statvfs(self.path)
        free = stat.f_bavail * stat.f_frsize - leave_kib * 1024
        with open(self.path / "filler", "ab") as handle:
            handle.write(b"\0" * max(free, 0))

    def free(self, size: str = "64m") -> None:
        (self.path / "filler").unlink(missing_ok=True)
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

    def stray(self) -> list[str]:
        """What an interrupted write would have left: temporary or staging files."""
        return [str(p) for p in self.path.rglob(".*") if p.name.startswith((".tmp-", ".staging-"))]


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[SmallDisk]:
    path = tmp_path / "disk"
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield SmallDisk(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


TINY = ("--hidden-sizes", "32", "--latent-size", "4", "--limit", "1000", "--no-progress")


def test_train_says_the_disk_is_full_and_resumes_once_freed(disk: SmallDisk, mnist_dir: Path) -> None:
    run = disk.path / "run"
    args = ("train", "--preset", "seed", "--data-dir", str(mnist_dir), *TINY, "--out", str(run))
    full = vae(*args, "--epochs", "3")
    assert_one_line_error(full, 1, "no space left on the device holding", str(run))
    assert not disk.stray()
    disk.free()
    resumed = vae("train", "--resume", "--out", str(run), "--epochs", "3", "--no-progress")
    if not (run / "checkpoint.pt").exists():  # the first checkpoint did not fit: start again
        resumed = vae(*args, "--epochs", "3")
    assert resumed.returncode == 0, resumed.stderr
    assert "to epoch 3" in resumed.stdout


def test_export_writes_no_version_on_a_full_disk(disk: SmallDisk, tiny_run: Path, mnist_dir: Path) -> None:
    disk.fill(leave_kib=100)
    repo = disk.path / "models"
    result = vae("export", "--checkpoint", str(tiny_run), "--repo", str(repo), "--name", "tiny",
                 "--data-dir", str(mnist_dir), "--iw-samples", "2", "--no-progress")  # fmt: skip
    assert_one_line_error(result, 1, "no space left on the device holding", str(repo / "tiny"))
    assert not (repo / "tiny" / "1").exists() and not disk.stray()


def test_evaluate_and_label_keep_what_was_there(
    disk: SmallDisk, tiny_run: Path, repo: Path, mnist_dir: Path
) -> None:
    disk.free("16m")  # room for the copies, then none
    run = disk.path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("plots", "evaluation-*"))
    models = disk.path / "models"
    shutil.copytree(repo, models, ignore=shutil.ignore_patterns("*.int8.onnx", "*.fp16.onnx"))
    assert vae("label", "--repo", str(models), "--name", "tiny", "stable=1").returncode == 0
    disk.fill(leave_kib=0)
    evaluated = vae("evaluate", "--run", str(run), "--data-dir", str(mnist_dir), "--iw-samples", "2",
                    "--no-pictures", "--no-progress")  # fmt: skip
    assert_one_line_error(evaluated, 1, "no space left on the device holding", str(run))
    assert not (run / "evaluation-test.json").exists()
    labelled = vae("label", "--repo", str(models), "--name", "tiny", "canary=1")
    assert_one_line_error(labelled, 1, "no space left on the device holding")
    assert json.loads((models / "tiny" / "labels.json").read_text()) == {"stable": 1}
    assert not disk.stray()


@pytest.mark.parametrize("command", ["embed", "score"])
def test_embed_and_score_resume_once_space_is_freed(
    disk: SmallDisk, repo: Path, mnist, tmp_path: Path, command: str
) -> None:
    rows = mnist.test_images[:6000].reshape(6000, -1)
    source = tmp_path / "rows.npy"
    np.save(source, rows)
    output = disk.path / "out.parquet"
    args = (command, "--model", str(repo / "tiny"), "--input", str(source), "--output", str(output),
            "--chunk-rows", "500", "--no-progress")  # fmt: skip
    if command == "score":
        args += ("--iw-samples", "2")
    disk.fill(leave_kib=120)  # room for a few chunks, not for all of them
    full = vae(*args)
    assert_one_line_error(full, 1, "no space left on the device holding", "--resume continues")
    assert not output.exists() and not disk.stray()
    disk.free()
    resumed = vae(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    fresh = tmp_path / "fresh.parquet"
    again = [a if a != str(output) else str(fresh) for a in args]
    assert vae(*again).returncode == 0
    import pyarrow.parquet as pq

    assert pq.read_table(output).equals(pq.read_table(fresh))


def test_embed_with_no_room_for_a_chunk_keeps_nothing(
    disk: SmallDisk, repo: Path, mnist, tmp_path: Path
) -> None:
    source = tmp_path / "rows.npy"
    np.save(source, mnist.test_images[:6000].reshape(6000, -1))
    output = disk.path / "out.npy"
    disk.fill(leave_kib=8)
    result = vae(
        "embed",
        "--model",
        str(repo / "tiny"),
        "--input",
        str(source),
        "--output",
        str(output),
        "--no-progress",
    )
    assert_one_line_error(result, 1, "nothing kept")
    assert "no space left on" in result.stderr.lower()
    assert sorted(p.name for p in disk.path.iterdir()) == ["filler"]
