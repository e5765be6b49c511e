"""Train (tiny, real) → export → load with onnxruntime → exact, self-describing, never half-written."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from vaeserve.datasets import evaluation_inputs
from vaeserve.errors import CheckpointError, ExportError, RepositoryError
from vaeserve.evaluation import evaluate
from vaeserve.export.exporter import ExportRequest, export_model
from vaeserve.repository import copy_version, open_path, resolve, sha256_file, version_numbers
from vaeserve.runtime import OnnxPair
from vaeserve.training import checkpoint
from vaeserve.training.backend import numpy_callables

INFERENCE_OPS = {
    "Gemm",
    "MatMul",
    "Add",
    "Relu",
    "Split",
    "Softplus",
    "Greater",
    "Where",
    "Sigmoid",
    "Slice",
    "Constant",
    "Reshape",
}


@pytest.fixture(scope="session")
def model_and_pair(repo: Path, tiny_run: Path):
    return checkpoint.model_from(checkpoint.load(tiny_run)), OnnxPair.load(resolve(repo, "tiny"))


def copy_repo(repo: Path, tmp_path: Path) -> Path:
    shutil.copytree(repo, tmp_path / "models")
    return tmp_path / "models"


@pytest.mark.parametrize("batch", [1, 7, 1000, 10000])
def test_onnx_matches_pytorch_on_the_real_test_set(model_and_pair, mnist, batch: int) -> None:
    model, pair = model_and_pair
    x = evaluation_inputs(mnist.test_images[:batch], "threshold")
    z = np.random.default_rng(batch).standard_normal((batch, model.latent_size), dtype=np.float32)
    with torch.no_grad():
        mean, stddev = (t.numpy() for t in model.encode(torch.from_numpy(x)))
        probs = torch.sigmoid(model.decode(torch.from_numpy(z))).numpy()
    onnx_mean, onnx_stddev = pair.encode(x)
    np.testing.assert_allclose(onnx_mean, mean, atol=1e-5, rtol=0)
    np.testing.assert_allclose(onnx_stddev, stddev, atol=1e-5, rtol=0)
    np.testing.assert_allclose(pair.decode(z)[1], probs, atol=1e-5, rtol=0)


def test_graphs_are_self_describing_inference_only(repo: Path, tiny_run: Path) -> None:
    version = resolve(repo, "tiny", "latest")
    manifest = version.manifest.to_dict()  # as written
    assert manifest["schema_version"] == 1 and manifest["opset"] == 18
    assert (manifest["input_size"], manifest["latent_size"], manifest["image_shape"]) == (784, 8, [28, 28])
    assert manifest["source_checkpoint"]["sha256"] == sha256_file(tiny_run / "best.pt")
    # The rows trained on: TINY's --limit of 5,000, not the split's 50,000.
    assert manifest["training"]["split_sizes"] == {"train": 5000, "validation": 10000, "test": 10000}
    evaluation = manifest["evaluation"]
    saved = tiny_run / "evaluation-test.json"
    if evaluation["source"] == "checkpoint":  # the run was evaluated before the export
        assert evaluation["nll"] == json.loads(saved.read_text())["nll"]
    else:
        assert evaluation["source"] == "onnx-at-export" and evaluation["iw_samples"] == 10
    assert evaluation["nll"] > 0 and evaluation["rows"] == 10000
    encoder_io = manifest["graphs"]["encoder"]
    assert encoder_io["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 784]}]
    assert [o["name"] for o in encoder_io["outputs"]] == ["mean", "stddev"]
    assert [o["name"] for o in manifest["graphs"]["decoder"]["outputs"]] == ["logits", "probs"]
    # The registered architecture describes itself: its name, its words, its config keys' values.
    described = manifest["architecture"]
    assert described["name"] == "mlp" and described["encoder"].startswith("MLP 784-")
    assert described["hidden_sizes"] and described["activation"]
    for role in ("encoder", "decoder"):
        proto = onnx.load(version.graph_path(role))
        props = {p.key: p.value for p in proto.metadata_props}
        assert props["role"] == role and props["model_name"] == "tiny" and props["latent_size"] == "8"
        assert props["binarization"] == "threshold" and props["model_version"] == "1"
        assert {n.op_type for n in proto.graph.node} <= INFERENCE_OPS
    int8 = manifest["variants"]["int8"]
    assert int8["device"] == "cpu" and abs(int8["test_elbo_change"]) < 5
    assert manifest["variants"]["fp16"]["max_abs_diff_vs_fp32"]["probs"] < 1e-2


def test_versions_next_free_and_force(repo: Path, tmp_path: Path, tiny_run: Path, mnist_dir: Path) -> None:
    models = copy_repo(repo, tmp_path)
    second = export_model(ExportRequest(tiny_run, models, "tiny", iw_samples=2, data_dir=mnist_dir))
    assert second.version == 2 and resolve(models, "tiny").version == 2
    assert open_path(models / "tiny").version == 2 and open_path(models / "tiny" / "1").version == 1
    with pytest.raises(ExportError, match="already exists; pass --force"):
        export_model(ExportRequest(tiny_run, models, "tiny", version=1, data_dir=mnist_dir))
    before = (models / "tiny" / "1" / "manifest.json").read_text()
    export_model(
        ExportRequest(tiny_run, models, "tiny", version=1, force=True, iw_samples=2, data_dir=mnist_dir)
    )
    assert (models / "tiny" / "1" / "manifest.json").read_text() != before
    assert version_numbers(models / "tiny") == [1, 2]
    assert not [p for p in (models / "tiny").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda v: v.joinpath("encoder.onnx").write_bytes(v.joinpath("encoder.onnx").read_bytes()[:-100]),
            r"encoder\.onnx: \d+ bytes, the manifest says",
        ),
        (lambda v: _flip_byte(v / "decoder.onnx"), r"decoder\.onnx: SHA-256 does not match"),
        (lambda v: _rewrite_manifest(v, "encoder", "sha256", "0" * 64), r"encoder\.onnx: SHA-256"),
        (lambda v: (v / "encoder.int8.onnx").unlink(), r"encoder\.int8\.onnx: listed in the manifest"),
        (lambda v: (v / "manifest.json").write_text("{"), "corrupt manifest"),
    ],
)
def test_tampered_files_are_refused_naming_the_file(repo: Path, tmp_path: Path, damage, message) -> None:
    models = copy_repo(repo, tmp_path)
    damage(models / "tiny" / "1")
    with pytest.raises(RepositoryError, match=message):
        resolve(models, "tiny", 1)


def test_a_copied_version_names_itself_and_is_verified_as_any_version(repo: Path, tmp_path: Path) -> None:
    models = copy_repo(repo, tmp_path)
    assert (
        copy_version(models / "tiny" / "1", tmp_path / "other", "later", 3)
        == tmp_path / "other" / "later" / "3"
    )
    copy = resolve(tmp_path / "other", "later")
    assert (copy.name, copy.version) == ("later", 3)
    assert copy.manifest.graphs == resolve(models, "tiny", 1).manifest.graphs
    assert [p.name for p in (tmp_path / "other" / "later").iterdir()] == ["3"]  # no staging left
    _flip_byte(models / "tiny" / "1" / "decoder.onnx")
    copy_version(models / "tiny" / "1", tmp_path / "other", "later", 4)  # copied as it is...
    with pytest.raises(RepositoryError, match=r"later/4/decoder\.onnx: SHA-256"):
        resolve(tmp_path / "other", "later", 4)  # ...and refused where it is loaded
    with pytest.raises(RepositoryError, match="no manifest"):
        copy_version(tmp_path, tmp_path / "other", "later", 5)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _rewrite_manifest(version: Path, role: str, key: str, value) -> None:
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["graphs"][role][key] = value
    (version / "manifest.json").write_text(json.dumps(manifest))


def test_cli_errors_are_one_line(repo: Path, tmp_path: Path, mnist_dir: Path) -> None:
    models = copy_repo(repo, tmp_path)
    _flip_byte(models / "tiny" / "1" / "encoder.onnx")
    (tmp_path / "empty" / "tiny").mkdir(parents=True)
    (tmp_path / "foreign.pt").write_bytes(b"junk")
    cases = [
        (["evaluate", "--model", str(models / "tiny" / "1")], "encoder.onnx: SHA-256"),
        (["evaluate", "--model", str(tmp_path / "empty" / "tiny")], "no versions of model 'tiny'"),
        (
            ["export", "--checkpoint", str(tmp_path / "foreign.pt"), "--repo", str(models), "--name", "x"],
            "not a readable checkpoint",
        ),
        (["export", "--checkpoint", str(tmp_path), "--repo", str(models), "--name", "x"], "holds no best.pt"),
        (
            [
                "export",
                "--checkpoint",
                str(tmp_path),
                "--repo",
                str(models),
                "--name",
                "x",
                "--variants",
                "int4",
            ],
            "expected some of int8, fp16",
        ),
    ]
    for args, fragment in cases:
        result = subprocess.run(
            [sys.executable, "-m", "vaeserve.cli", *args], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0], result.stderr


def test_unknown_checkpoint_format(tmp_path: Path, tiny_run: Path) -> None:
    state = checkpoint.load(tiny_run / "best.pt")
    torch.save({**state, "format_version": 99}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format version 99"):
        export_model(ExportRequest(tmp_path / "future.pt", tmp_path / "models", "m"))
    assert not (tmp_path / "models").exists()


def test_a_failed_check_writes_nothing(tmp_path: Path, tiny_run: Path, mnist_dir: Path, monkeypatch) -> None:
    from vaeserve.export import checks

    monkeypatch.setattr(checks, "PARITY_TOLERANCE", 0.0)
    monkeypatch.setattr(checks, "ROUNDING_MARGIN", 0.0)
    with pytest.raises(ExportError, match=r"do not match PyTorch: mean differs by .* \(tolerance 0\.0e\+00;"):
        export_model(ExportRequest(tiny_run, tmp_path / "models", "tiny", data_dir=mnist_dir))
    assert list((tmp_path / "models" / "tiny").iterdir()) == []


def test_parity_allows_pytorchs_own_float32_rounding_and_no_more(
    tmp_path: Path, tiny_run: Path, repo: Path, mnist_dir: Path
) -> None:
    """Means in the hundreds of thousands: float32 PyTorch is itself far more than 1e-5 from the
    model in float64, and so is its correct graph, which exports; a wrong graph still fails."""
    from vaeserve.datasets import load_dataset
    from vaeserve.export import checks

    state = checkpoint.load(tiny_run / "best.pt")
    latent = state["config"]["latent_size"]
    state["model"]["encoder.2.weight"][:latent] *= 1e5  # the means' rows
    state["model"]["encoder.2.bias"][:latent] *= 1e5
    torch.save(state, tmp_path / "large.pt")
    manifest = export_model(
        ExportRequest(tmp_path / "large.pt", tmp_path / "models", "large", data_dir=mnist_dir)
    ).manifest
    assert manifest.parity["float32_rounding"]["mean"] > 1e-5  # the old absolute bound alone would refuse it
    assert (
        manifest.parity["max_abs_diff"]["mean"]
        <= checks.ROUNDING_MARGIN * manifest.parity["float32_rounding"]["mean"]
    )

    model = checkpoint.model_from(state).eval()
    images = evaluation_inputs(
        load_dataset("mnist", mnist_dir, progress=False).test_images[:1000], "threshold"
    )
    other = resolve(repo, "tiny").path  # the same network, unscaled: a wrong graph for this model
    wrong = OnnxPair(other / "encoder.onnx", other / "decoder.onnx")
    with pytest.raises(ExportError, match=r"do not match PyTorch: mean differs"):
        checks.check_parity(*checks.max_differences(model, wrong, images))


def test_killed_export_leaves_no_version(tmp_path: Path, tiny_run: Path, mnist_dir: Path) -> None:
    models = tmp_path / "models"
    command = [
        sys.executable,
        "-m",
        "vaeserve.cli",
        "export",
        "--checkpoint",
        str(tiny_run),
        "--repo",
        str(models),
        "--name",
        "tiny",
        "--data-dir",
        str(mnist_dir),
        "--variants",
        "int8,fp16",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(models.glob("tiny/.staging-*/encoder.onnx")):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    [killed] = [p.parent for p in models.glob("tiny/.staging-*/encoder.onnx")]
    assert version_numbers(models / "tiny") == []
    with pytest.raises(RepositoryError, match="no versions"):
        resolve(models, "tiny")
    # An export still running (this process) and one on another host keep their folders.
    running = models / "tiny" / f".staging-1-{os.getpid()}@{socket.gethostname()}-abc123"
    elsewhere = models / "tiny" / f".staging-1-{proc.pid}@another-host-abc123"
    for folder in (running, elsewhere):
        folder.mkdir()
    assert (
        export_model(ExportRequest(tiny_run, models, "tiny", iw_samples=2, data_dir=mnist_dir)).version == 1
    )
    assert not killed.exists(), "the killed export's staging folder was not swept"
    assert running.exists() and elsewhere.exists()


def test_evaluating_the_onnx_pair_agrees_with_the_checkpoint(model_and_pair, mnist) -> None:
    model, pair = model_and_pair
    x = evaluation_inputs(mnist.test_images[:1000], "threshold")
    encode, decode = numpy_callables(model)
    torch_result = evaluate(encode, decode, x, iw_samples=50, seed=0)
    same_draws = evaluate(pair.encode, pair.decode_logits, x, iw_samples=50, seed=0)
    other_draws = evaluate(pair.encode, pair.decode_logits, x, iw_samples=50, seed=1)
    assert same_draws.nll == pytest.approx(torch_result.nll, abs=1e-3)
    assert same_draws.active_units == torch_result.active_units
    # Independent draws agree within Monte-Carlo error (here a paired difference, tiny).
    assert abs(other_draws.nll - torch_result.nll) < 0.2
    assert abs(other_draws.elbo - torch_result.elbo) < 4 * torch_result.elbo_stderr


def test_evaluate_model_needs_no_torch(repo: Path, mnist_dir: Path) -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from vaeserve.cli import main\n"
        f"sys.exit(main(['evaluate', '--model', {str(repo / 'tiny')!r}, '--data-dir', {str(mnist_dir)!r},"
        " '--iw-samples', '5', '--limit', '500', '--json', '--variant', 'int8', '--no-progress']))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["rows"] == 500 and out["iw_samples"] == 5 and out["nll"] > 0
