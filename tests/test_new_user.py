"""What a new user tripped on (issue 36), each tried again as they tried it: no silent wrong
answer, one rule for shapes and dtypes, one default k, defaults that do not move, one-line errors."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import servers
from test_cli import assert_one_line_error, vae
from test_newcomer import two_models  # noqa: F401 - the fixture: tiny beside wee

from vaeserve._proto import vae_pb2, vae_pb2_grpc
from vaeserve.client import ServiceError, VaeClient
from vaeserve.codec import UINT8, to_tensor
from vaeserve.datasets import model_inputs
from vaeserve.errors import TensorError
from vaeserve.ood import REFERENCE_IW_SAMPLES
from vaeserve.rows import as_rows


def binary_uint8(pixels: np.ndarray) -> np.ndarray:
    """Binarized MNIST as it is often stored: uint8 holding 0 and 1."""
    return (pixels > 127).astype(np.uint8)


# -- uint8 0/1 pixels --------------------------------------------------------------------------
def test_uint8_zero_one_rows_are_refused_saying_how_to_send_them() -> None:
    pixels = binary_uint8(np.random.default_rng(0).integers(0, 256, (4, 784)).astype(np.uint8))
    with pytest.raises(TensorError, match=r"only 0 and 1.*array \* 255.*astype\('float32'\)"):
        as_rows(pixels, "inputs")
    with pytest.raises(TensorError, match="only 0 and 1"):
        as_rows(pixels.astype(np.int64), "inputs")  # the same values in another integer type
    black = np.zeros((2, 784), np.uint8)
    assert as_rows(black, "inputs") is black  # an all-black batch is pixels, not a mistake
    assert as_rows(pixels * 255, "inputs").dtype == np.uint8


def test_the_server_and_the_client_refuse_uint8_zero_one(serve, mnist) -> None:
    server = serve("--workers", "1")
    pixels = binary_uint8(mnist.test_images[:8])
    with grpc.insecure_channel(server.target) as channel:  # past the client's own check
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Encode(vae_pb2.EncodeRequest(inputs=to_tensor(pixels)), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "only 0 and 1" in refused.value.details()
    body = {
        "inputs": [{"name": "x", "shape": [8, 784], "datatype": "UINT8", "data": pixels.ravel().tolist()}]
    }
    request = urllib.request.Request(
        f"http://{server.http}/v2/models/tiny-encoder/infer", json.dumps(body).encode(), method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as http:
        urllib.request.urlopen(request, timeout=30)
    assert http.value.code == 400 and "only 0 and 1" in json.loads(http.value.read())["error"]
    with VaeClient(server.target) as client, pytest.raises(TensorError, match="only 0 and 1"):
        client.encode(pixels)
    with VaeClient(server.target) as client:  # what the message says to do works
        as_255 = client.encode(pixels * 255)["mean"]
        as_float = client.encode(pixels.astype(np.float32))["mean"]
    np.testing.assert_allclose(as_255, as_float, atol=1e-6)
    assert np.ptp(as_255, axis=0).max() > 0.1  # the rows embed apart, not alike


def test_vae_embed_refuses_uint8_zero_one(repo: Path, mnist, tmp_path: Path) -> None:
    source = tmp_path / "binarized.npy"
    np.save(source, binary_uint8(mnist.test_images[:300]))
    result = vae(
        "embed", "--model", str(repo / "tiny"), "--input", str(source), "--output", str(tmp_path / "o.npy")
    )
    assert_one_line_error(result, 1, "binarized.npy", "only 0 and 1", "* 255")
    assert not (tmp_path / "o.npy").exists()


# -- one set of shape and dtype rules ------------------------------------------------------------
def test_the_client_takes_what_vae_embed_takes(serve, mnist) -> None:
    server = serve("--workers", "1")
    images = mnist.test_images[:16]  # uint8 [N, 28, 28]
    flat = images.reshape(16, 784)
    with VaeClient(server.target) as client:
        expected = client.encode(flat)["mean"]
        np.testing.assert_array_equal(client.encode(images)["mean"], expected)  # [N, 28, 28]
        np.testing.assert_array_equal(client.encode(flat[3])["mean"], expected[3:4])  # one [784]
        np.testing.assert_array_equal(client.encode(flat.astype(np.int64))["mean"], expected)  # int64 pixels
        floats = model_inputs(flat, "threshold")
        np.testing.assert_array_equal(client.encode(floats)["mean"], expected)
        with pytest.raises(
            TensorError, match=r"int64 values span \[300, 300\]; integer pixels must be 0-255"
        ):
            client.encode(np.full((1, 784), 300, np.int64))
        with pytest.raises(ServiceError, match=r"flatten each row: array.reshape\(2, 784\)"):
            client._call(  # the server's own message for a shape the client would have flattened
                client.stub.Encode,
                vae_pb2.EncodeRequest(
                    inputs=vae_pb2.Tensor(shape=[2, 28, 28], dtype=UINT8, data=bytes(2 * 784))
                ),
            )


# -- the default model ---------------------------------------------------------------------------
def test_with_several_models_and_no_default_unnamed_calls_are_refused(
    two_models: Path,  # noqa: F811
    tmp_path: Path,
    mnist,
) -> None:
    pixels = mnist.test_images[:4]
    with servers.running(two_models, tmp_path / "serve.log", "--workers", "1") as server:
        with VaeClient(server.target) as client, pytest.raises(ServiceError) as refused:
            client.encode(pixels)
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "['tiny', 'wee']" in refused.value.details and "--default-model" in refused.value.details
        with VaeClient(server.target, model="wee") as client:
            assert client.encode(pixels)["mean"].shape == (4, 4)
    assert "no --default-model: requests must name their model" in (tmp_path / "serve.log").read_text()
    flags = ("--workers", "1", "--default-model", "wee")
    with (
        servers.running(two_models, tmp_path / "wee.log", *flags) as server,
        VaeClient(server.target) as client,
    ):
        assert client.encode(pixels)["mean"].shape == (4, 4)


def test_a_model_added_later_does_not_move_the_default(repo: Path, tmp_path: Path, mnist) -> None:
    models = tmp_path / "models"
    shutil.copytree(repo, models)
    flags = ("--workers", "1", "--poll-s", "0.2")
    with (
        servers.running(models, tmp_path / "serve.log", *flags) as server,
        VaeClient(server.target) as client,
    ):
        assert client.model_info()[0]["is_default"]
        servers.add_model(models, "tiny", "aardvark", tmp_path)  # first by name
        servers.until(lambda: len(client.model_info()) == 2, 30, "aardvark loaded")
        defaults = {m["name"] for m in client.model_info() if m["is_default"]}
        assert defaults == {"tiny"}
        assert client.encode(mnist.test_images[:2])["mean"].shape == (2, 8)


def test_an_unknown_default_model_is_one_line(repo: Path) -> None:
    result = vae("serve", "--repo", str(repo), "--default-model", "nosuch", "--port", "0", "--http-port", "0")
    errors = [line for line in result.stderr.splitlines() if "INFO" not in line]
    assert result.returncode == 1 and len(errors) == 1, result.stderr
    assert "--default-model nosuch: no such servable model" in errors[0] and "(found: tiny)" in errors[0]


# -- Score's k -----------------------------------------------------------------------------------
def test_score_defaults_to_the_references_k_everywhere(serve, mnist) -> None:
    server = serve("--workers", "1")
    x = mnist.test_images[:64].reshape(64, 784)
    with grpc.insecure_channel(server.target) as channel:
        answer = vae_pb2_grpc.VaeServiceStub(channel).Score(
            vae_pb2.ScoreRequest(inputs=to_tensor(x), seed=3), timeout=60
        )
    assert answer.iw_samples == REFERENCE_IW_SAMPLES == 10
    with VaeClient(server.target) as client:
        by_default = client.score(x, seed=3)["log_px"]
        at_ten = client.score(x, iw_samples=10, seed=3)["log_px"]
        at_one = client.score(x, iw_samples=1, seed=3)
    np.testing.assert_array_equal(by_default, at_ten)
    assert at_ten.mean() > at_one["log_px"].mean()  # k = 10's bound is the tighter one


def test_vae_score_flags_rows_and_says_what_log_px_is(repo: Path, mnist, tmp_path: Path) -> None:
    source = tmp_path / "rows.npy"
    rows = mnist.test_images[:200].reshape(200, 784).copy()
    rows[:5] = 0  # blank images: more typical than nearly every test row
    np.save(source, rows)
    out = tmp_path / "scores.npy"
    result = vae(
        "score", "--model", str(repo / "tiny"), "--input", str(source), "--output", str(out), "--no-progress"
    )
    assert result.returncode == 0, result.stderr
    assert "k = 10: log_px is the importance-weighted bound" in result.stdout
    assert "ood_flag: -1/+1 outside the test set's 0.5 % tails" in result.stdout
    scores = np.load(out)
    assert scores["ood_flag"].dtype == np.int8 and set(np.unique(scores["ood_flag"])) <= {-1, 0, 1}
    assert (scores["ood_flag"][:5] != 0).all() and np.mean(scores["ood_flag"][5:] == 0) > 0.9
    sidecar = json.loads(Path(f"{out}.manifest.json").read_text())
    assert sidecar["score"]["iw_samples"] == 10 and "ood_flag" in sidecar["fields"]
    at_one = tmp_path / "k1.npy"
    result = vae("score", "--model", str(repo / "tiny"), "--input", str(source), "--output", str(at_one),
                 "--iw-samples", "1", "--no-progress")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "k = 1: log_px is a one-sample estimate of the ELBO, a lower bound on log p(x)" in result.stdout
    assert "no ood_flag: the reference percentiles are at k = 10" in result.stdout
    assert "ood_flag" not in np.load(at_one).dtype.names  # never compared with another k's reference


# -- export of a run that stopped early ------------------------------------------------------------
def test_export_says_a_run_stopped_before_its_planned_epochs(mnist, mnist_dir: Path, tmp_path: Path) -> None:
    from vaeserve.training.config import resolve_config
    from vaeserve.training.trainer import start_or_resume

    config = resolve_config("seed", None, {"hidden_sizes": [16], "latent_size": 2, "epochs": 3, "limit": 1000,
                                           "batch_size": 100})  # fmt: skip
    trainer = start_or_resume(config, mnist, tmp_path / "run", resume=False, progress=False)
    trainer.history.append(trainer.train_epoch())  # one epoch of three, as a run interrupted after it
    trainer.save_epoch(trainer.history[-1])
    result = vae("export", "--checkpoint", str(tmp_path / "run"), "--repo", str(tmp_path / "models"),
                 "--name", "early", "--data-dir", str(mnist_dir), "--no-progress")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "note: trained 1 of 3 planned epochs: it was interrupted" in result.stdout
    manifest = json.loads((tmp_path / "models" / "early" / "1" / "manifest.json").read_text())
    assert manifest["training"]["planned_epochs"] == 3 and manifest["training"]["epochs"] == 1
    assert manifest["training"]["stopped_early"].startswith("trained 1 of 3")
    assert manifest["training"]["split_sizes"]["train"] == 1000  # --limit's rows, not the split's


# -- a gRPC client at the REST port, health --wait, --repo of one model ----------------------------
def test_grpc_clients_at_the_rest_port_say_so_in_one_line(serve, repo: Path, mnist, tmp_path: Path) -> None:
    server = serve("--workers", "1")
    np.save(tmp_path / "rows.npy", mnist.test_images[:10])
    hint = "likely the server's REST port"
    assert_one_line_error(vae("client", "--target", server.http, "--out", str(tmp_path / "o")), 1, hint)
    health = vae("health", "--target", server.http)
    assert health.returncode == 1 and hint in health.stdout and len(health.stdout.splitlines()) == 1
    embed = vae("embed", "--model", str(repo / "tiny"), "--input", str(tmp_path / "rows.npy"),
                "--output", str(tmp_path / "e.npy"), "--server", server.http, "--no-progress")  # fmt: skip
    assert_one_line_error(embed, 1, hint)


def test_health_wait_ends_when_the_server_it_waits_for_exits(repo: Path, tmp_path: Path) -> None:
    """--wait asks until SERVING; a server that answered and then refuses connections has exited,
    and the wait ends there instead of at its minute."""
    server = servers.start(repo, tmp_path / "serve.log", "--workers", "1")
    client = VaeClient(server.target, timeout=3)
    answers = []
    asked = client.health

    def counted(*args, **kwargs):
        try:
            return asked(*args, **kwargs)
        finally:
            answers.append(1)

    client.health = counted
    outcome: list = []

    def wait() -> None:  # a service the server does not know: answered NOT_FOUND, never SERVING
        started = time.monotonic()
        try:
            outcome.append(client.poll_health(60, "nosuch"))
        except ServiceError as exc:
            outcome.append(exc)
        outcome.append(time.monotonic() - started)

    waiting = threading.Thread(target=wait)
    waiting.start()
    servers.until(lambda: answers, 30, "a first answer")
    assert server.stop() == 0
    waiting.join(60)
    client.close()
    error, elapsed = outcome
    assert isinstance(error, ServiceError) and "stopped answering (it exited?)" in str(error), error
    assert elapsed < 30, elapsed


def test_a_model_folder_given_as_the_repository_gets_the_way_out(repo: Path) -> None:
    result = vae("serve", "--repo", str(repo / "tiny"), "--port", "0", "--http-port", "0")
    errors = [line for line in result.stderr.splitlines() if "INFO" not in line]
    assert result.returncode == 1 and len(errors) == 1, result.stderr
    assert "looks like one model" in errors[0] and f"--repo {repo} --model tiny" in errors[0]


# -- help and interruptions ------------------------------------------------------------------------
def test_no_help_text_prints_two_defaults_or_none() -> None:
    from vaeserve.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    for name, command in commands.items():
        text = " ".join(command.format_help().split())
        assert "(default: None)" not in text, name
        assert not re.search(r"\(default[^)]*\) \(default", text), name


def test_train_interrupted_before_its_first_epoch_says_nothing_was_kept(
    mnist_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    train = subprocess.Popen(
        [sys.executable, "-m", "vaeserve.cli", "train", "--data-dir", str(mnist_dir), "--out", str(out),
         "--epochs", "50", "--no-progress"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    servers.until(lambda: (out / "config.json").exists() or train.poll() is not None, 120, "training started")
    kept = (out / "checkpoint.pt").exists()
    train.send_signal(signal.SIGINT)
    stderr = train.communicate(timeout=120)[1]
    assert train.returncode == 130, stderr
    if kept or (out / "checkpoint.pt").exists():  # an epoch finished before the signal landed
        assert f"the completed epochs are kept in {out}: vae train --resume" in stderr
    else:
        assert "interrupted; no epoch had completed, so nothing was kept" in stderr
    assert "Traceback" not in stderr


def test_embed_interrupted_says_what_it_kept_not_trainings_advice(
    repo: Path, mnist, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from vaeserve import cli
    from vaeserve.embed import job

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "embed_chunks", interrupted)
    source = tmp_path / "rows.npy"
    np.save(source, mnist.test_images[:100])
    code = cli.main(["embed", "--model", str(repo / "tiny"), "--input", str(source), "--output",
                     str(tmp_path / "o.npy"), "--no-progress"])  # fmt: skip
    stderr = capsys.readouterr().err
    assert code == 130
    assert stderr.strip() == "vae embed: interrupted; nothing resumable, so nothing kept"
