"""Out-of-distribution detection, MNIST vs Fashion-MNIST in both directions: the AUROC of the
plain likelihood (−log p(x), the k-sample bound) and of the input-complexity correction
(S(x) = −log₂ p(x) − PNG bits, Serrà et al. 2020), from the Score path's own code
(vaeserve.ood.scores, the function behind the Score RPC and `vae score`).

    python -m benchmarks.ood --mnist-dir ../shared/data/mnist \\
        --fashion-dir /usr/share/datasets/fashion-mnist --work runs/ood --plot docs/ood.png

trains a VAE of the `--preset` (`seed` by default) on each dataset's dequantized pixels with the
continuous Bernoulli likelihood (unless WORK already holds the runs), exports both, scores both
test sets under both models and prints the table. Fashion-MNIST: `apt install dataset-fashion-mnist`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from vaeserve.datasets import load_dataset, model_inputs
from vaeserve.ood import auroc, scores
from vaeserve.repository import open_path
from vaeserve.runtime import OnnxPair

DATASETS = ("mnist", "fashion-mnist")
SCORES = {"likelihood": "−log₂ p(x)", "corrected": "−log₂ p(x) − PNG bits"}


def train_and_export(name: str, data_dir: Path, work: Path, preset: str, flags: list[str]) -> Path:
    """WORK/NAME (the run) and WORK/models/NAME/1, each made unless already there."""
    from vaeserve.cli import main

    run, model = work / name, work / "models" / name / "1"
    if not (run / "best.pt").exists():
        args = ["train", "--preset", preset, "--dataset", name, "--data-dir", str(data_dir)]
        if main([*args, "--out", str(run), *flags]) != 0:
            raise SystemExit(f"training {name} failed")
    if not model.exists():
        args = ["export", "--checkpoint", str(run), "--repo", str(work / "models"), "--name", name]
        if main([*args, "--data-dir", str(data_dir), "--iw-samples", "100"]) != 0:
            raise SystemExit(f"exporting {name} failed")
    return model


def score_sets(model: Path, tests: dict[str, np.ndarray], iw_samples: int) -> dict[str, dict]:
    version = open_path(model)
    pair = OnnxPair.load(version)
    binarization = version.manifest.binarization
    return {
        name: scores(
            pair.encode,
            pair.decode_logits,
            model_inputs(pixels, binarization),
            iw_samples,
            0,
            version.likelihood,
            version.image_shape,
            prior=version.load_prior(),
        )
        for name, pixels in tests.items()
    }


def detection(scored: dict[str, dict], inlier: str, outlier: str) -> dict[str, float]:
    plain = {name: -s["log_px"] for name, s in scored.items()}
    corrected = {name: s["ood_score"] for name, s in scored.items()}
    return {
        "likelihood": auroc(plain[inlier], plain[outlier]),
        "corrected": auroc(corrected[inlier], corrected[outlier]),
    }


def _window(inliers: np.ndarray, both: np.ndarray) -> tuple[float, float]:
    """The x range: the in-distribution scores and two of their spans either side, within the
    1st-99th percentiles of both sets. Out-of-distribution scores run to hundreds of thousands
    of bits and would squash the rest; the tails are counted in the end bins."""
    first, last = np.percentile(inliers, [1, 99])
    span = last - first
    low, high = np.percentile(both, [1, 99])
    return max(low, first - 2 * span), min(high, last + 2 * span)


def plot(results: dict, scored: dict[str, dict[str, dict]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for row, (trained, by_set) in enumerate(scored.items()):
        for col, key in enumerate(SCORES):
            ax = axes[row][col]
            values = {
                name: -s["log_px"] / np.log(2) if key == "likelihood" else s["ood_score"]
                for name, s in by_set.items()
            }
            low, high = _window(values[trained], np.concatenate(list(values.values())))
            for name, colour in zip(DATASETS, ("tab:blue", "tab:orange")):
                clipped = np.clip(values[name], low, high)
                ax.hist(
                    clipped,
                    bins=80,
                    range=(low, high),
                    alpha=0.55,
                    density=True,
                    color=colour,
                    label=f"{name} test",
                )
            auc = results[trained][key]
            ax.set(
                title=f"trained on {trained}: {SCORES[key]}\nAUROC {auc:.3f}", xlabel="bits", ylabel="density"
            )
            ax.legend()
    fig.suptitle(
        "Out-of-distribution scores: higher means less like the training data (tails in the end bins)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mnist-dir", type=Path, required=True)
    parser.add_argument("--fashion-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--work", type=Path, default=Path("runs/ood"), help="runs and exported models")
    parser.add_argument("--plot", type=Path, default=Path("docs/ood.png"))
    parser.add_argument("--preset", default="seed", help="preset both models train from (default seed)")
    parser.add_argument("--iw-samples", type=int, default=100, help="k of the log p(x) bound (default 100)")
    parser.add_argument("--rows", type=int, default=10_000, help="test rows of each set (default all)")
    parser.add_argument(
        "--train-flags",
        default="--binarization dequantize --likelihood continuous-bernoulli --no-progress",
        help="flags of both trainings (default: dequantized pixels, continuous Bernoulli)",
    )
    args = parser.parse_args(argv)
    dirs = {"mnist": args.mnist_dir, "fashion-mnist": args.fashion_dir}
    tests = {
        name: load_dataset(name, dirs[name], progress=False).test_images[: args.rows] for name in DATASETS
    }
    models = {
        name: train_and_export(name, dirs[name], args.work, args.preset, args.train_flags.split())
        for name in DATASETS
    }
    started = time.perf_counter()
    scored = {name: score_sets(model, tests, args.iw_samples) for name, model in models.items()}
    seconds = time.perf_counter() - started
    results = {
        "mnist": detection(scored["mnist"], "mnist", "fashion-mnist"),
        "fashion-mnist": detection(scored["fashion-mnist"], "fashion-mnist", "mnist"),
    }
    print(
        f"| trained on | out-of-distribution | AUROC {SCORES['likelihood']} | AUROC {SCORES['corrected']} |"
    )
    print("|---|---|---|---|")
    for trained, outlier in (("mnist", "fashion-mnist"), ("fashion-mnist", "mnist")):
        row = results[trained]
        print(f"| {trained} | {outlier} test | {row['likelihood']:.3f} | {row['corrected']:.3f} |")
    rows = sum(len(t) for t in tests.values()) * len(models)
    picture = plot(results, scored, args.plot)
    print(f"scored {rows:,} rows with k = {args.iw_samples} in {seconds:.0f} s; histograms: {picture}")
    (args.work / "ood.json").write_text(
        json.dumps({"preset": args.preset, "iw_samples": args.iw_samples, "auroc": results}, indent=2)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
