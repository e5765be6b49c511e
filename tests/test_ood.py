"""Likelihood scoring in front of another model: the tiny MNIST model's Score, through the
service, tells MNIST test digits from Fashion-MNIST (Debian's dataset-fashion-mnist, when
installed) or, without it, from a set made here (MNIST digits turned inside out), and its
scores equal the in-process ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import servers

from vaeserve.datasets import load_dataset, model_inputs
from vaeserve.ood import auroc, scores
from vaeserve.repository import open_path
from vaeserve.runtime import OnnxPair

FASHION = Path("/usr/share/datasets/fashion-mnist")
ROWS = 500


@pytest.fixture(scope="module")
def outliers(mnist) -> np.ndarray:
    if (FASHION / "t10k-images-idx3-ubyte.gz").exists():
        return load_dataset("fashion-mnist", FASHION, progress=False).test_images[:ROWS]
    return 255 - mnist.test_images[ROWS : 2 * ROWS]  # white digits on black: not MNIST


def test_scores_through_the_service_separate_the_sets_and_equal_in_process(
    repo: Path, mnist, outliers, tmp_path: Path
) -> None:
    from vaeserve.client import VaeClient

    inliers = mnist.test_images[:ROWS]
    with (
        servers.running(repo, tmp_path / "serve.log", "--workers", "1") as server,
        VaeClient(server.target, model="tiny", chunk_rows=128) as client,
    ):
        served = {
            name: client.score(x, iw_samples=4, seed=9) for name, x in (("in", inliers), ("out", outliers))
        }
    assert auroc(-served["in"]["log_px"], -served["out"]["log_px"]) > 0.95
    assert auroc(served["in"]["ood_score"], served["out"]["ood_score"]) > 0.95
    version = open_path(repo / "tiny")
    pair = OnnxPair.load(version)
    local = scores(
        pair.encode,
        pair.decode_logits,
        model_inputs(inliers, version.manifest.binarization),
        4,
        9,
        version.likelihood,
        version.image_shape,
    )
    for name, values in local.items():
        np.testing.assert_allclose(served["in"][name], values, rtol=1e-5, atol=1e-3)
