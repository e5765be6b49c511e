"""What a new user tripped on (issue 24), each tried again as they tried it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import servers
from test_cli import assert_one_line_error, vae
from test_live import until

from vaeserve.export.exporter import ExportRequest, export_model

WEE = {"hidden_sizes": [32], "latent_size": 4, "epochs": 1, "limit": 2000, "batch_size": 64}


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory, repo: Path, mnist, mnist_dir: Path) -> Path:
    """The tiny model (8 latents, the server's default: the first by name) beside `wee` (4)."""
    from vaeserve.training.config import resolve_config
    from vaeserve.training.trainer import start_or_resume

    run = tmp_path_factory.mktemp("wee_run")
    start_or_resume(resolve_config("seed", None, WEE), mnist, run, resume=False, progress=False).run()
    both = tmp_path_factory.mktemp("two") / "models"
    shutil.copytree(repo, both)
    export_model(ExportRequest(run, both, "wee", iw_samples=2, data_dir=mnist_dir))
    return both


def test_vae_client_reports_the_model_it_called(two_models: Path, mnist_dir: Path, tmp_path: Path) -> None:
    with servers.running(two_models, tmp_path / "serve.log") as server:
        out = tmp_path / "demo"
        args = ("client", "--target", server.target, "--model", "wee", "--data-dir", str(mnist_dir))
        result = vae(*args, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("wee/1 "), result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["model"]["name"], summary["model"]["latent_size"]) == ("wee", 4)
    assert summary["encode_stream_equals_encode"] is True
    assert summary["score"]["rows"] == 1000 and summary["score"]["mean_elbo"] < 0


def test_vae_client_asks_the_server_before_any_download(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{servers.free_port()}"
    env = {**os.environ, "VAESERVE_CACHE_DIR": str(tmp_path / "empty-cache")}
    result = subprocess.run(
        [sys.executable, "-m", "vaeserve.cli", "client", "--target", dead, "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert_one_line_error(result, 1, "UNAVAILABLE")
    assert "download" not in result.stderr.lower() and not (tmp_path / "empty-cache").exists()


def test_vae_client_help_shows_defaults_and_follows_vaeserve_port() -> None:
    env = {**os.environ, "VAESERVE_PORT": "12345"}
    command = [sys.executable, "-m", "vaeserve.cli", "client", "--help"]
    shown = subprocess.run(command, capture_output=True, text=True, env=env).stdout
    assert "(default: 127.0.0.1:12345)" in " ".join(shown.split()), shown
    assert "(default: out/demo)" in " ".join(shown.split())


def test_train_resume_reads_the_recorded_data_offline(mnist_dir: Path, tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    tiny = ("--hidden-sizes", "32", "--latent-size", "4", "--limit", "1000", "--no-progress")
    first = vae(
        "train", "--preset", "seed", "--data-dir", str(mnist_dir), *tiny, "--epochs", "1", "--out", run
    )
    assert first.returncode == 0, first.stderr
    offline = {**os.environ, "VAESERVE_CACHE_DIR": str(tmp_path / "empty-cache")}
    resume = [sys.executable, "-m", "vaeserve.cli", "train", "--resume", "--out", run, "--no-progress"]
    more = subprocess.run([*resume, "--epochs", "2"], capture_output=True, text=True, env=offline)
    assert more.returncode == 0, more.stderr
    assert more.stdout.startswith("trained 1 epochs (to epoch 2) in "), more.stdout
    again = subprocess.run([*resume, "--epochs", "2"], capture_output=True, text=True, env=offline)
    assert again.returncode == 0 and again.stdout.startswith("nothing to train"), again.stdout + again.stderr
    assert not (tmp_path / "empty-cache").exists()


def test_load_dataset_takes_a_string_path(mnist_dir: Path) -> None:
    from vaeserve.datasets import load_dataset

    assert load_dataset("mnist", str(mnist_dir), progress=False).test_images.shape[0] == 10000


def test_health_names_the_services_it_knows_and_wait_is_bounded(repo: Path, tmp_path: Path) -> None:
    with servers.running(repo, tmp_path / "serve.log", "--workers", "1") as server:
        unknown = vae("health", "--target", server.target, "--service", "nosuch")
    assert unknown.returncode == 1
    assert "no health for service 'nosuch'" in unknown.stdout and "vae.v1.VaeService" in unknown.stdout
    dead = f"127.0.0.1:{servers.free_port()}"
    started = time.monotonic()
    waited = vae("health", "--target", dead, "--wait", "2")
    # Python's start-up and imports come on top of the 2 s; before, a last full ask added 3 s more.
    assert waited.returncode == 1 and "UNAVAILABLE" in waited.stdout
    assert time.monotonic() - started < 4.5


def test_grpc_sent_to_the_rest_port_is_one_line_in_the_log(repo: Path, tmp_path: Path) -> None:
    with servers.running(repo, tmp_path / "serve.log") as server:
        assert vae("health", "--target", server.http, "--timeout", "2").returncode == 1
        until(lambda: "refused a malformed HTTP request" in server.output())
        log = server.output()
    assert "Traceback" not in log and "gRPC goes to the gRPC port" in log
    assert "metrics on :off" not in log and "metrics served by the supervisor" in log


@pytest.mark.parametrize("flags", [("--model", "nosuch"), ("--version", "7")])
def test_serve_refuses_a_repository_with_nothing_to_serve_once(
    repo: Path, flags: tuple[str, ...], tmp_path: Path
) -> None:
    command = ["serve", "--repo", str(repo), *flags, "--port", str(servers.free_port())]
    result = vae(*command, "--workers", "2", "--metrics-port", "0", "--http-port", "0")
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "INFO" not in line]
    assert len(errors) == 1 and "no servable model" in errors[0], result.stderr
    assert ("no model 'nosuch' (models there: tiny)" if "nosuch" in flags else "has no version 7") in errors[
        0
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = vae("serve", "--repo", str(empty), "--port", str(servers.free_port()), "--workers", "2")
    errors = [line for line in nothing.stderr.splitlines() if "INFO" not in line]
    assert nothing.returncode == 1 and len(errors) == 1 and "it holds no model versions" in errors[0]


def test_blank_constant_and_noise_images_fall_outside_the_test_sets_scores(
    repo: Path, mnist, tmp_path: Path
) -> None:
    """The served model's info carries the test set's score percentiles (from its export); a
    blank, a constant and a noise image each fall in one of the two tails, test images rarely."""
    from vaeserve.client import VaeClient
    from vaeserve.ood import outside

    rng = np.random.default_rng(0)
    odd = {
        "blank": np.zeros(784, np.uint8),
        "constant": np.full(784, 200, np.uint8),
        "noise": rng.integers(0, 256, 784).astype(np.uint8),
    }
    with (
        servers.running(repo, tmp_path / "serve.log", "--workers", "1") as server,
        VaeClient(server.target) as client,
    ):
        metrics = client.model_info("tiny")[0]["metrics"]
        tails = {p: metrics[f"ood_score_p{p}"] for p in ("0.5", "99.5")}
        strange = client.score(np.stack(list(odd.values())), iw_samples=10, seed=0)["ood_score"]
        typical = client.score(mnist.test_images[:2000].reshape(2000, -1), iw_samples=10, seed=0)["ood_score"]
    flags = outside(strange, tails)
    assert all(flags != 0), dict(zip(odd, zip(strange, flags)))
    assert np.mean(outside(typical, tails) != 0) < 0.03


def test_embed_messages_and_what_a_failed_job_leaves(repo: Path, mnist, tmp_path: Path) -> None:
    from PIL import Image

    model = str(repo / "tiny")
    missing = vae("embed", "--model", str(repo / "tiny" / "9"), "--input", "x.npy", "--output", "o.npy")
    assert_one_line_error(missing, 1, "no version 9; versions there: [1]")
    whole = vae("embed", "--model", str(repo), "--input", "x.npy", "--output", "o.npy")
    assert_one_line_error(whole, 1, "is a model repository, not a model", "models there: tiny")
    Image.fromarray(mnist.test_images[0].reshape(28, 28)).save(tmp_path / "one.png")
    one = tmp_path / "one.npy"
    assert (
        vae("embed", "--model", model, "--input", str(tmp_path / "one.png"), "--output", str(one)).returncode
        == 0
    )
    assert np.load(one).shape == (1,)
    again = vae(
        "embed", "--model", model, "--input", str(tmp_path / "one.png"), "--output", str(one), "--resume"
    )
    assert again.returncode == 0 and again.stdout.startswith("nothing to do: "), again.stderr
    rows = mnist.test_images[:3000].reshape(3000, -1).astype(np.float32) / 255
    rows[2500, 3] = np.nan  # the input's fault, in the last chunk: nothing a resume could use
    np.save(tmp_path / "nan.npy", rows)
    out = tmp_path / "nan-out.npy"
    bad = vae("embed", "--model", model, "--input", str(tmp_path / "nan.npy"), "--output", str(out),
              "--chunk-rows", "1000", "--no-progress")  # fmt: skip
    assert_one_line_error(bad, 1, "NaN or infinity", "nothing kept")
    assert sorted(p.name for p in tmp_path.glob("nan-out*")) == []


def test_embed_with_shared_memory_against_a_server_without_it_keeps_nothing(
    repo: Path, mnist, tmp_path: Path
) -> None:
    np.save(tmp_path / "rows.npy", mnist.test_images[:2000].reshape(2000, -1))
    out = tmp_path / "out.npy"
    with servers.running(repo, tmp_path / "serve.log", "--workers", "1") as server:
        args = ("--input", str(tmp_path / "rows.npy"), "--output", str(out), "--server", server.target)
        result = vae("embed", "--model", str(repo / "tiny"), *args, "--shared-memory", "--no-progress")
    assert result.returncode == 1 and "nothing kept" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.glob("out*")) == []


def test_label_lists_and_log_level_after_the_command(repo: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(repo, models)
    listed = vae("label", "--repo", str(models), "--name", "tiny")
    assert listed.returncode == 0 and "tiny: no labels (versions [1])" in listed.stdout
    assert vae("health", "--target", "127.0.0.1:1", "--log-level", "DEBUG").returncode == 1  # parsed


def test_serve_warns_of_a_misspelt_variable(repo: Path) -> None:
    env = {**os.environ, "VAESERVE_PORTT": "1"}
    command = [sys.executable, "-m", "vaeserve.cli", "serve", "--repo", str(repo), "--model", "nosuch"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert (
        result.stderr.count("ignoring VAESERVE_PORTT") == 1 and "did you mean VAESERVE_PORT?" in result.stderr
    )


def test_export_names_the_tested_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from vaeserve.errors import ExportError
    from vaeserve.export import graphs

    graphs.check_torch()  # this one is tested
    monkeypatch.setattr(torch, "__version__", "2.11.0+cpu")
    with pytest.raises(ExportError, match=r"tested with torch 2\.13; this is torch 2\.11\.0"):
        graphs.check_torch()


def test_a_limited_evaluation_says_it_was_not_saved(tiny_run: Path, mnist_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "evaluation-test.json").unlink(missing_ok=True)
    result = vae("evaluate", "--run", str(run), "--data-dir", str(mnist_dir), "--limit", "100",
                 "--iw-samples", "2", "--no-pictures", "--no-progress")  # fmt: skip
    assert result.returncode == 0 and "not saved (a partial evaluation: --limit, --offset)" in result.stdout
    assert not (run / "evaluation-test.json").exists()
