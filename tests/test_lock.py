"""One lock for everything: uv.lock agrees with pyproject.toml, the images' requirement files are
what it exports, the build is pinned to it, and this environment is what it pins."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
UV = Path(sys.executable).parent / "uv"  # the lock's own uv, in .venv
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCKED = {p["name"]: p for p in tomllib.loads((ROOT / "uv.lock").read_text())["package"]}


def lock_check(folder: Path) -> subprocess.CompletedProcess:
    """`scripts/lock.sh --check` in ``folder``, with the lock's own uv."""
    env = {"UV": str(UV), "PATH": f"{UV.parent}:/usr/bin:/bin"}
    command = ["bash", "scripts/lock.sh", "--check"]
    return subprocess.run(command, cwd=folder, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """What the lock is made from and exported to, copied to be changed."""
    copy = tmp_path / "project"
    (copy / "scripts").mkdir(parents=True)
    for name in ("pyproject.toml", "uv.lock", "README.md", "scripts/lock.sh"):
        shutil.copy(ROOT / name, copy / name)
    shutil.copytree(ROOT / "docker", copy / "docker")
    return copy


def test_the_lock_agrees_with_pyproject_and_the_images_files() -> None:
    checked = lock_check(ROOT)
    assert checked.returncode == 0, checked.stderr


def test_a_dependency_changed_without_the_lock_fails_the_check(project: Path) -> None:
    pyproject = project / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('    "orjson>=3.9",\n', "", 1))
    checked = lock_check(project)
    assert checked.returncode == 1
    assert "uv.lock disagrees with pyproject.toml: run make lock" in checked.stderr


def test_an_exported_file_edited_by_hand_fails_the_check(project: Path) -> None:
    service = project / "docker" / "requirements-service.txt"
    service.write_text(service.read_text().replace("grpcio==1.85.4", "grpcio==1.85.3"))
    checked = lock_check(project)
    assert checked.returncode == 1
    assert "docker/requirements-service.txt differs from what uv.lock exports" in checked.stderr


def test_the_build_requirements_are_the_locks_build_group() -> None:
    """setup.py's stubs come from the grpcio-tools pinned with the grpcio they run on."""
    build = PYPROJECT["build-system"]["requires"]
    assert build == PYPROJECT["dependency-groups"]["build"]
    for requirement in build:
        name, version = requirement.split("==")
        assert LOCKED[name]["version"] == version, (name, LOCKED[name]["version"], version)
    assert LOCKED["grpcio-tools"]["version"] == LOCKED["grpcio"]["version"]


def test_every_image_installs_from_the_lock_with_hashes() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    installs = [line for line in dockerfile.splitlines() if "pip.sh install" in line]
    assert installs and all("--require-hashes -r /opt/build/requirements-" in line for line in installs)
    assert "--no-build-isolation" in dockerfile
    for image in ("service", "train", "cuda", "build"):
        text = (ROOT / "docker" / f"requirements-{image}.txt").read_text()
        pins = [line.split(" ;")[0] for line in text.splitlines() if line[:1].isalnum()]
        assert pins, image
        for pin in pins:
            if pin.startswith("file://"):  # torch's CPU wheel, by path and hash
                assert pin.endswith(Path(LOCKED["torch"]["source"]["path"]).name)
                continue
            name, version = pin.split("==")
            assert LOCKED[name]["version"] == version, (image, pin)
    assert "onnxruntime==" not in (ROOT / "docker" / "requirements-cuda.txt").read_text()


@pytest.mark.parametrize("name", ["grpcio", "grpcio-tools", "protobuf", "onnxruntime", "numpy", "torch"])
def test_this_environment_is_what_the_lock_pins(name: str) -> None:
    assert importlib.metadata.version(name) == LOCKED[name]["version"]


def test_the_generated_stubs_run_on_this_grpcio() -> None:
    from vaeserve._proto import vae_pb2_grpc

    assert grpc.__version__ == vae_pb2_grpc.GRPC_GENERATED_VERSION
