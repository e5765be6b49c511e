"""Training runs for real: determinism, exact resume after Ctrl-C, run-directory contents."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import pytest
import torch

from vaeserve.errors import ConfigError
from vaeserve.training import checkpoint
from vaeserve.training.config import resolve_config
from vaeserve.training.trainer import start_or_resume

SMALL = {"hidden_sizes": [32], "latent_size": 4, "limit": 2000}


def train(mnist, run_dir: Path, epochs: int, resume: bool = False, **extra) -> dict:
    config = resolve_config("seed", None, {**SMALL, "epochs": epochs, **extra})
    start_or_resume(config, mnist, run_dir, resume=resume, progress=False).run()
    return checkpoint.load(run_dir / checkpoint.LAST)


def assert_same_weights(a: dict, b: dict) -> None:
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


def test_same_seed_same_model_other_seed_other_model(mnist, tmp_path: Path) -> None:
    a = train(mnist, tmp_path / "a", 1)
    b = train(mnist, tmp_path / "b", 1)
    c = train(mnist, tmp_path / "c", 1, seed=1)
    assert_same_weights(a, b)
    assert not torch.equal(a["model"]["encoder.0.weight"], c["model"]["encoder.0.weight"])


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {
            "binarization": "dynamic",
            "optimizer": "adam",
            "objective": "iwae",
            "train_samples": 3,
            "kl_warmup_epochs": 2,
        },
    ],
)
def test_resume_continues_exactly(mnist, tmp_path: Path, extra: dict) -> None:
    whole = train(mnist, tmp_path / "whole", 2, **extra)
    train(mnist, tmp_path / "split", 1, **extra)
    resumed = train(mnist, tmp_path / "split", 2, resume=True, **extra)
    assert_same_weights(whole, resumed)
    assert resumed["costs"] == whole["costs"]
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_run_directory_holds_everything(tiny_run: Path) -> None:
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["latent_size"] == 8
    state = checkpoint.load(tiny_run / "best.pt")
    assert state["epoch"] in (1, 2) and state["dataset"]["split_sizes"]["validation"] == 10000
    history = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert history[1]["validation_elbo"] > history[0]["validation_elbo"]  # it learns
    assert len(state["costs"]) == state["epoch"] * (5000 // 64)


def test_cli_interrupt_keeps_checkpoint_and_resume_matches(mnist_dir: Path, tmp_path: Path) -> None:
    """Ctrl-C mid-run, resume, and land on the same weights as one uninterrupted run."""
    flags = [
        "--data-dir",
        str(mnist_dir),
        "--hidden-sizes",
        "64",
        "--latent-size",
        "8",
        "--limit",
        "30000",
        "--epochs",
        "3",
        "--no-progress",
    ]
    vae = [sys.executable, "-m", "vaeserve.cli", "train"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run([*vae, *flags, "--out", str(tmp_path / "whole")], check=True, env=env, capture_output=True)
    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [*vae, *flags, "--out", str(interrupted)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell that runs the suite in the background starts it with SIGINT ignored, and
        # Python keeps an ignored SIGINT ignored: give the child the default back.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not (interrupted / checkpoint.LAST).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # into the second epoch
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    kept = checkpoint.load(interrupted / checkpoint.LAST)
    assert kept["epoch"] in (1, 2)
    subprocess.run(
        [*vae, *flags, "--out", str(interrupted), "--resume"], check=True, env=env, capture_output=True
    )
    assert_same_weights(
        checkpoint.load(tmp_path / "whole" / checkpoint.LAST), checkpoint.load(interrupted / checkpoint.LAST)
    )


def test_training_pictures_are_real_images(mnist_dir: Path, tmp_path: Path) -> None:
    from vaeserve.cli import main

    run_dir = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data-dir",
                str(mnist_dir),
                "--hidden-sizes",
                "32",
                "--latent-size",
                "2",
                "--limit",
                "3000",
                "--epochs",
                "1",
                "--no-progress",
                "--out",
                str(run_dir),
            ]
        )
        == 0
    )
    names = {p.name for p in (run_dir / "plots").glob("*.png")}
    assert names == {
        "learning_curves.png",
        "posterior_predictive.png",
        "prior_predictive.png",
        "latent_manifold.png",
        "latent_pca.png",
    }
    for name in names:
        pixels = matplotlib.image.imread(run_dir / "plots" / name)
        assert pixels.shape[0] > 200 and pixels.std() > 0.05, name


def test_choosing_the_elbo_drops_a_presets_iwae_samples() -> None:
    """--objective elbo on an IWAE preset trains one sample and records k = 1; asking the ELBO for
    k > 1 is refused, since only the IWAE bound uses it."""
    assert resolve_config("conv", None, {}).train_samples == 2
    elbo = resolve_config("conv", None, {"objective": "elbo"})
    assert elbo.objective == "elbo" and elbo.train_samples == 1
    assert resolve_config("best", None, {"objective": "iwae"}).train_samples == 5
    with pytest.raises(ConfigError, match="train_samples = 3 is the iwae objective's k"):
        resolve_config("seed", None, {"objective": "elbo", "train_samples": 3})


def test_an_iwae_run_names_its_train_figure_the_iwae_bound(mnist_dir: Path, tmp_path: Path, capsys) -> None:
    """The per-epoch train figure is the training objective: an IWAE run's lies above its ELBO,
    so the summary and the learning curves call it the IWAE bound of k samples, never the ELBO."""
    from vaeserve.cli import main
    from vaeserve.training.objectives import objective_name

    flags = ["train", "--data-dir", str(mnist_dir), "--hidden-sizes", "32", "--latent-size", "2"]
    flags += ["--limit", "2000", "--epochs", "1", "--no-progress"]
    assert main([*flags, "--objective", "iwae", "--train-samples", "3", "--out", str(tmp_path / "iwae")]) == 0
    summary = capsys.readouterr().out
    assert "train IWAE bound (k = 3) " in summary and "train ELBO" not in summary, summary
    assert main([*flags, "--out", str(tmp_path / "elbo")]) == 0
    assert "train ELBO " in capsys.readouterr().out
    assert objective_name("elbo", 5) == "ELBO" and objective_name("iwae", 2) == "IWAE bound (k = 2)"


def test_early_stopping_and_time_budget(mnist, tmp_path: Path) -> None:
    from vaeserve.training.trainer import Trainer

    config = resolve_config("seed", None, {**SMALL, "epochs": 50, "patience": 2})
    trainer = Trainer(config, mnist, tmp_path / "patient", progress=False)
    trainer.history = [{"validation_elbo": v} for v in (-120.0, -110.0, -111.0, -112.0)]
    assert "no better validation ELBO in 2 epochs" in trainer.stop_reason(time.perf_counter())
    trainer.history.append({"validation_elbo": -100.0})
    assert trainer.stop_reason(time.perf_counter()) == ""
    budget = resolve_config("seed", None, {**SMALL, "epochs": 50, "max_minutes": 0.001})
    history = start_or_resume(budget, mnist, tmp_path / "budget", resume=False, progress=False).run()
    assert 1 <= len(history) < 50  # stopped by the 0.06-second budget after its first epoch
    saved = checkpoint.load(tmp_path / "budget" / checkpoint.LAST)
    # The last epoch's checkpoint says why the run ended there (what export's manifest reports).
    assert saved["epoch"] == len(history) and saved["stopped"] == "the --max-minutes 0.001 budget was spent"


def test_best_preset_is_a_valid_config() -> None:
    config = resolve_config("best", None, {})
    assert config.binarization == "dynamic" and config.objective == "iwae" and config.max_minutes
    conv = resolve_config("conv", None, {})
    assert conv.architecture == "conv" and conv.optimizer == "adam" and conv.max_minutes == config.max_minutes


def test_lr_end_anneals_over_the_budget_whatever_the_epochs_took(mnist, tmp_path) -> None:
    """--lr-end: the learning rate falls from --lr to it as the epochs' seconds spend the budget,
    so a fast machine's many short epochs and a slow one's few long ones end at the same rate;
    a flag for either schedule replaces the preset's other one, and both at once are refused."""
    from vaeserve.training.trainer import Trainer

    config = resolve_config("seed", None, {**SMALL, "lr": 1e-3, "lr_end": 1e-5, "max_minutes": 10.0})
    assert config.lr_decay == 1.0
    trainer = Trainer(config, mnist, tmp_path / "annealed", progress=False)
    assert trainer.learning_rate() == pytest.approx(1e-3)
    trainer.history = [{"seconds": 150.0}, {"seconds": 150.0}]  # half the 10 minutes
    assert trainer.learning_rate() == pytest.approx(1e-4)
    trainer.history = [{"seconds": 30.0}] * 10  # the same half in ten short epochs
    assert trainer.learning_rate() == pytest.approx(1e-4)
    trainer.history.append({"seconds": 600.0})  # past the budget (a resumed run): held at the end
    assert trainer.learning_rate() == pytest.approx(1e-5)
    assert resolve_config("conv", None, {}).lr_end == 5e-5
    per_epoch = resolve_config("conv", None, {"lr_decay": 0.9})
    assert (per_epoch.lr_decay, per_epoch.lr_end) == (0.9, None)
    with pytest.raises(ConfigError, match="choose one"):
        resolve_config("conv", None, {"lr_decay": 0.9, "lr_end": 1e-4})
    with pytest.raises(ConfigError, match="set that budget"):
        resolve_config("seed", None, {"lr_end": 1e-4})
    with pytest.raises(ConfigError, match="lr_end must be in"):
        resolve_config("conv", None, {"lr_end": 1.0})


def test_an_architecture_brings_its_defaults_to_a_preset_made_for_another() -> None:
    """The presets are the MLP's: `--architecture conv` on one takes conv's optimiser, initialiser,
    learning rate and latent size (the seed's diverge on it), unless a flag sets them."""
    config = resolve_config("seed", None, {"architecture": "conv"})
    assert (config.optimizer, config.init, config.lr, config.latent_size) == ("adam", "torch", 2e-3, 32)
    chosen = resolve_config("seed", None, {"architecture": "conv", "optimizer": "tf1-rmsprop", "lr": 1e-4})
    assert (chosen.optimizer, chosen.lr, chosen.init) == ("tf1-rmsprop", 1e-4, "torch")
    assert resolve_config("seed", None, {}).optimizer == "tf1-rmsprop"  # the MLP keeps the seed's
