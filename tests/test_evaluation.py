import json
from pathlib import Path

import numpy as np
import pytest

from vaeserve.datasets import evaluation_inputs
from vaeserve.evaluation import evaluate
from vaeserve.repository import sha256_file
from vaeserve.training import checkpoint
from vaeserve.training.backend import numpy_callables


@pytest.fixture(scope="module")
def pair_and_x(tiny_run: Path, mnist):
    encode, decode = numpy_callables(checkpoint.model_from(checkpoint.load(tiny_run)))
    return encode, decode, evaluation_inputs(mnist.test_images[:300], "threshold")


def test_nll_bounds_elbo_and_shrinks_with_k(pair_and_x) -> None:
    encode, decode, x = pair_and_x
    results = {k: evaluate(encode, decode, x, iw_samples=k, seed=0) for k in (1, 10, 200)}
    for r in results.values():
        assert r.nll <= -r.elbo + 3 * r.elbo_stderr / np.sqrt(r.iw_samples) + 0.3
        assert r.kl > 0 and r.reconstruction < 0
    assert results[200].nll < results[10].nll < results[1].nll
    assert results[200].nll < -results[200].elbo  # a strictly tighter bound at k = 200
    assert 0 < results[200].active_units <= 8


def test_evaluation_is_reproducible_and_seeded(pair_and_x) -> None:
    encode, decode, x = pair_and_x
    a = evaluate(encode, decode, x, iw_samples=20, seed=5)
    b = evaluate(encode, decode, x, iw_samples=20, seed=5)
    c = evaluate(encode, decode, x, iw_samples=20, seed=6)
    assert a.nll == b.nll and a.elbo == b.elbo
    assert a.nll != c.nll
    assert abs(a.nll - c.nll) < 4 * a.nll_stderr


def test_blocks_split_large_k_without_changing_results(pair_and_x, monkeypatch) -> None:
    import vaeserve.evaluation as evaluation

    encode, decode, x = pair_and_x
    whole = evaluate(encode, decode, x[:10], iw_samples=64, seed=1)
    monkeypatch.setattr(evaluation, "BLOCK_VALUES", 16 * 784)  # k = 64 now spans four draws per image
    split = evaluate(encode, decode, x[:10], iw_samples=64, seed=1)
    assert split.nll == pytest.approx(whole.nll, abs=2.0)
    assert split.active_units == whole.active_units


def test_vae_evaluate_cli_writes_json_and_pictures(tiny_run: Path, mnist_dir: Path, capsys) -> None:
    from vaeserve.cli import main

    code = main(
        [
            "evaluate",
            "--run",
            str(tiny_run),
            "--data-dir",
            str(mnist_dir),
            "--iw-samples",
            "20",
            "--json",
            "--no-progress",
        ]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((tiny_run / "evaluation-test.json").read_text())
    assert printed["rows"] == 10000 and saved["nll"] == printed["nll"]
    assert saved["checkpoint_sha256"] == sha256_file(tiny_run / "best.pt")
    assert 60 < printed["nll"] < 250 and printed["nll"] <= -printed["elbo"] + 0.5
    limited = ["evaluate", "--run", str(tiny_run), "--data-dir", str(mnist_dir), "--split", "validation"]
    assert (
        main([*limited, "--limit", "300", "--iw-samples", "3", "--json", "--no-pictures", "--no-progress"])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["rows"] == 300


def test_slices_of_an_evaluation_add_up_to_it(tiny_run: Path, mnist_dir: Path, capsys, mnist) -> None:
    """`vae evaluate --offset N --limit M` scores rows N … N+M−1 as the whole evaluation does
    (its binarization draws and its importance samples are the rows' own), so slices evaluated
    apart, on other machines or days, combine into the whole one exactly."""
    from vaeserve.cli import main
    from vaeserve.datasets import evaluation_slice

    common = ["evaluate", "--run", str(tiny_run), "--data-dir", str(mnist_dir), "--iw-samples", "7"]
    common += ["--json", "--no-pictures", "--no-progress"]
    found = {}
    for offset, limit in ((0, 300), (0, 120), (120, 180)):
        assert main([*common, "--offset", str(offset), "--limit", str(limit)]) == 0
        found[offset, limit] = json.loads(capsys.readouterr().out)
    assert found[120, 180]["first_row"] == 120 and found[120, 180]["rows"] == 180
    for key in ("nll", "elbo", "kl"):
        parts = found[0, 120][key] * 120 + found[120, 180][key] * 180
        assert parts == pytest.approx(found[0, 300][key] * 300, rel=1e-6), key
    images = mnist.test_images[:300]
    dynamic = evaluation_slice(images, "dynamic", 3, 100, 50)
    assert np.array_equal(dynamic, evaluation_inputs(images, "dynamic", 3)[100:150])
    past = main([*common, "--offset", "10000"])
    assert past == 1 and "--offset 10000: expected 0 to 9999" in capsys.readouterr().err


def test_a_score_folder_resumes_an_interrupted_evaluation(pair_and_x, tmp_path: Path) -> None:
    """`--scores DIR`: chunks scored before an interruption are read back, the rest scored, and
    the result equals the evaluation run whole (to float rounding); a folder of another
    evaluation's scores is refused."""
    from vaeserve.errors import ConfigError
    from vaeserve.evaluation import ScoreFolder

    encode, decode, x = pair_and_x
    x = x[:45]
    whole = evaluate(encode, decode, x, iw_samples=6, seed=2, first_row=0)
    calls = []

    def failing(z):
        calls.append(len(z))
        if len(calls) > 3:
            raise RuntimeError("interrupted")
        return decode(z)

    identity = {"model": "tiny", "iw_samples": 6}
    with pytest.raises(RuntimeError, match="interrupted"):
        evaluate(encode, failing, x, 6, seed=2, scores=ScoreFolder(tmp_path / "s", identity, chunk_rows=10))
    kept = sorted(p.name for p in (tmp_path / "s").glob("rows-*.npz"))
    assert 1 <= len(kept) < 5 and not list((tmp_path / "s").glob(".tmp-*"))
    resumed = evaluate(
        encode, decode, x, 6, seed=2, scores=ScoreFolder(tmp_path / "s", identity, chunk_rows=10)
    )
    assert resumed.rows_read_back == 10 * len(kept) and resumed.rows == 45
    for key in ("nll", "nll_stderr", "elbo", "kl", "reconstruction", "active_units"):
        # The same draws; the decoder's sums run in other batch sizes, so within float rounding.
        assert getattr(resumed, key) == pytest.approx(getattr(whole, key), rel=1e-7), key
    again = evaluate(
        encode, decode, x, 6, seed=2, scores=ScoreFolder(tmp_path / "s", identity, chunk_rows=10)
    )
    assert again.rows_read_back == 45 and again.nll == resumed.nll
    other = ScoreFolder(tmp_path / "s", {**identity, "iw_samples": 9}, chunk_rows=10)
    with pytest.raises(
        ConfigError, match="holds another evaluation's scores \\(iw_samples 6 there, 9 now\\)"
    ):
        evaluate(encode, decode, x, 9, seed=2, scores=other)


def test_vae_evaluate_scores_resumes_and_refuses_another_evaluation(
    tiny_run: Path, mnist_dir: Path, capsys, tmp_path: Path
) -> None:
    from vaeserve.cli import main

    folder = tmp_path / "scores"
    common = ["evaluate", "--run", str(tiny_run), "--data-dir", str(mnist_dir), "--limit", "150"]
    common += ["--json", "--no-pictures", "--no-progress", "--scores", str(folder)]
    assert main([*common, "--iw-samples", "5"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main([*common, "--iw-samples", "5"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert first["rows_read_back"] == 0 and second["rows_read_back"] == 150
    assert second["nll"] == first["nll"] and len(list(folder.glob("rows-*.npz"))) == 2
    assert main([*common, "--iw-samples", "6"]) == 1
    said = capsys.readouterr().err
    assert "holds another evaluation's scores (iw_samples 5 there, 6 now)" in said and "Traceback" not in said


def test_nll_converges_to_the_exact_marginal_likelihood() -> None:
    """With a 2-D latent, log p(x) = log ∫ p(x|z) p(z) dz by quadrature on a fine grid."""
    import torch

    from vaeserve.elbo import log_standard_normal
    from vaeserve.likelihoods import log_bernoulli
    from vaeserve.training.config import TrainConfig
    from vaeserve.training.model import VAE

    torch.manual_seed(0)
    encode, decode = numpy_callables(
        VAE.from_config(TrainConfig(hidden_sizes=(16,), latent_size=2, init="torch"), (30,))
    )
    x = (np.random.default_rng(0).random((20, 30)) < 0.4).astype(np.float32)
    grid = np.linspace(-8, 8, 801)
    z = np.stack(np.meshgrid(grid, grid), -1).reshape(-1, 2)
    logits = decode(z.astype(np.float32)).astype(np.float64)
    exact = []
    for row in x.astype(np.float64):
        log_joint = log_bernoulli(row[None, :], logits) + log_standard_normal(z)
        top = log_joint.max()
        exact.append(-(top + np.log(np.exp(log_joint - top).sum()) + 2 * np.log(grid[1] - grid[0])))
    result = evaluate(encode, decode, x, iw_samples=2000, seed=0)
    assert result.nll == pytest.approx(np.mean(exact), abs=0.1)
    assert -result.elbo > np.mean(exact)
