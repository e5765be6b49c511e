"""Bad input on the command line: one clear line on stderr, non-zero exit, no traceback."""

import os
import subprocess
import sys
from pathlib import Path


def vae(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vaeserve.cli", *args], capture_output=True, text=True, timeout=120
    )


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_wrong_flag_values(tmp_path: Path) -> None:
    out = str(tmp_path / "r")
    assert_one_line_error(vae("train", "--out", out, "--epochs", "many"), 2, "--epochs", "invalid int")
    assert_one_line_error(vae("train", "--out", out, "--optimizer", "sgd"), 2, "invalid choice")
    assert_one_line_error(vae("train", "--out", out, "--preset", "huge"), 2, "--preset")
    assert_one_line_error(vae("train"), 2, "--out")
    assert_one_line_error(vae("train", "--out", out, "--batch-size", "0"), 1, "batch_size")


def test_missing_and_corrupt_data(tmp_path: Path, mnist_dir: Path) -> None:
    out = str(tmp_path / "r")
    assert_one_line_error(
        vae("train", "--data-dir", str(tmp_path), "--out", out), 1, "no train-images-idx3-ubyte.gz"
    )
    for name in ("train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / name).symlink_to(mnist_dir / name)
    content = (mnist_dir / "train-images-idx3-ubyte.gz").read_bytes()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(content[: len(content) // 2])
    assert_one_line_error(
        vae("train", "--data-dir", str(tmp_path), "--out", out), 1, "train-images-idx3-ubyte.gz", "truncated"
    )
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_config_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "c.json"
    bad.write_text('{"hidden": [1]}')
    assert_one_line_error(
        vae("train", "--config", str(bad), "--out", str(tmp_path / "r")), 1, "unknown config keys"
    )
    bad.write_text("{nope")
    assert_one_line_error(
        vae("train", "--config", str(bad), "--out", str(tmp_path / "r")), 1, "not valid JSON"
    )


def test_run_directory_errors(tiny_run: Path, tmp_path: Path, mnist_dir: Path) -> None:
    data = ("--data-dir", str(mnist_dir))
    assert_one_line_error(vae("train", *data, "--out", str(tiny_run)), 1, "already holds a run", "--resume")
    assert_one_line_error(vae("train", *data, "--out", str(tmp_path), "--resume"), 1, "nothing to resume")
    assert_one_line_error(
        vae("train", *data, "--out", str(tiny_run), "--resume", "--latent-size", "3"), 1, "latent_size"
    )
    assert_one_line_error(vae("evaluate", "--run", str(tmp_path / "none")), 1, "no such checkpoint")
    (tmp_path / "foreign.pt").write_bytes(b"\x80\x04not a checkpoint")
    assert_one_line_error(
        vae("evaluate", "--run", str(tmp_path / "foreign.pt")), 1, "not a readable checkpoint"
    )


def test_help_explains_every_flag() -> None:
    from vaeserve.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"train", "evaluate"} <= set(commands)
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help and len(action.help) > 8, f"vae {name} {action.option_strings}"
    assert vae("train", "--help").returncode == 0


def test_serve_runs_on_the_event_loop_chosen() -> None:
    import asyncio

    from vaeserve.service.cli import run_on_event_loop

    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert run_on_event_loop(loop_module(), "asyncio").startswith("asyncio")
    assert run_on_event_loop(loop_module(), "uvloop").startswith("uvloop")
    assert run_on_event_loop(loop_module(), "auto").startswith("uvloop")  # installed with vaeserve


def test_a_missing_extra_is_named_with_its_install_command(tmp_path: Path) -> None:
    """What `vae train` says where torch is absent (the service image), simulated by hiding it."""
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\n")
    result = subprocess.run(
        [sys.executable, "-m", "vaeserve.cli", "train", "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert_one_line_error(
        result,
        1,
        "vae train needs the 'train' extra (torch is not installed)",
        "pip install 'vaeserve[train]'",
    )


def test_serve_ports_in_use_are_named(repo: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))  # bound, not listening: the bind itself fails
        port = str(taken.getsockname()[1])
        common = ("serve", "--repo", str(repo), "--host", "127.0.0.1")
        common += ("--http-port", "0")
        result = vae(*common, "--port", port, "--metrics-port", "0")
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert f"--host/--port 127.0.0.1:{port}: cannot listen there" in result.stderr
        result = vae(*common, "--port", "0", "--metrics-port", port)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert f"--metrics-port {port}: cannot listen on 127.0.0.1" in result.stderr
        result = vae(*common, "--port", "0", "--metrics-port", "0", "--http-port", port)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert f"--http-port {port}: cannot listen on 127.0.0.1" in result.stderr
        taken.listen()  # now something answers there: a stray server is refused before binding
        for flag in ("--port", "--http-port"):
            others = {"--port": "0", "--http-port": "0", flag: port}
            result = vae(*common[:-2], *[x for k, v in others.items() for x in (k, v)], "--metrics-port", "0")
            assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
            assert f"{flag} {port}: another server already listens there" in result.stderr
