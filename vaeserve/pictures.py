"""Pictures (PNG, matplotlib) of a model's four uses and of its training.

They work from plain callables, ``encode(x) -> (mean, stddev)`` and
``decode(z) -> logits``, so the same pictures come from a PyTorch checkpoint,
an ONNX pair or the gRPC service.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vaeserve.evaluation import Decode, Encode, encode_all
from vaeserve.layout import ImageLayout
from vaeserve.likelihoods import BERNOULLI, Likelihood
from vaeserve.prior import STANDARD, Prior


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def tile(images: np.ndarray, image_shape: tuple[int, ...], cols: int) -> np.ndarray:
    """Rows of images [N, D] as one mosaic, ``cols`` per row, 1-pixel gaps: [H', W'] for grey
    images, [H', W', C] for colour ones (vaeserve.layout decides which)."""
    layout = ImageLayout.of(image_shape)
    if layout is None:
        raise ValueError(f"rows of shape {tuple(image_shape)} are not images; expected [H, W] or [H, W, C]")
    pictures = layout.pictures(images)
    h, w = layout.height, layout.width
    rows = -(-len(images) // cols)
    canvas = np.ones(((h + 1) * rows - 1, (w + 1) * cols - 1, *pictures.shape[3:]), dtype=np.float32)
    for i, picture in enumerate(pictures):
        r, c = divmod(i, cols)
        canvas[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = picture
    return canvas


def save_panels(panels: list[tuple[str, np.ndarray]], path: Path, title: str) -> Path:
    """Side-by-side mosaics (grey [H, W] or colour [H, W, C], values in [0, 1]) with titles."""
    plt = _pyplot()
    aspect = max(m.shape[0] / m.shape[1] for _, m in panels)
    size = (4.2 * len(panels), 4.2 * aspect + 0.9)
    fig, axes = plt.subplots(1, len(panels), figsize=size, squeeze=False)
    for ax, (name, mosaic) in zip(axes[0], panels):
        if mosaic.ndim == 2:
            ax.imshow(mosaic, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        else:
            ax.imshow(np.clip(mosaic, 0.0, 1.0), interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)
    plt.close(fig)
    return path


def posterior_predictive(
    encode: Encode,
    decode: Decode,
    x: np.ndarray,
    image_shape: tuple[int, ...],
    path: Path,
    rng: np.random.Generator,
    likelihood: Likelihood = BERNOULLI,
) -> Path:
    """Originals beside E[x|z] and a sample of p(x|z), z ~ q(z|x)."""
    mean, stddev = encode(x)
    logits = decode(mean + stddev * rng.standard_normal(mean.shape, dtype=np.float32))
    probs, samples = likelihood.mean(logits), likelihood.sample(logits, rng)
    cols = int(np.ceil(np.sqrt(len(x))))
    panels = [("originals", x), ("means", probs), ("samples", samples)]
    return save_panels(
        [(n, tile(a, image_shape, cols)) for n, a in panels], path, "Posterior predictive (reconstruction)"
    )


def prior_predictive(
    decode: Decode,
    latent_size: int,
    count: int,
    image_shape: tuple[int, ...],
    path: Path,
    rng: np.random.Generator,
    likelihood: Likelihood = BERNOULLI,
    prior: Prior = STANDARD,
) -> Path:
    """E[x|z] and samples of p(x|z) for z ~ p(z), the model's prior."""
    logits = decode(prior.sample(count, latent_size, rng))
    probs, samples = likelihood.mean(logits), likelihood.sample(logits, rng)
    cols = int(np.ceil(np.sqrt(count)))
    panels = [
        ("means", tile(probs, image_shape, cols)),
        ("samples", tile(samples, image_shape, cols)),
    ]
    title = "z ~ N(0, I)" if prior.means is None else f"z ~ p(z), a mixture of {prior.components}"
    return save_panels(panels, path, f"Prior predictive, {title}")


def latent_manifold(
    decode: Decode,
    dims: tuple[int, int],
    latent_size: int,
    image_shape: tuple[int, ...],
    path: Path,
    steps: int = 20,
    extent: float = 2.5,
    likelihood: Likelihood = BERNOULLI,
) -> Path:
    """Decode a grid over two latent dimensions, the others at zero."""
    axis = np.linspace(-extent, extent, steps, dtype=np.float32)
    z = np.zeros((steps * steps, latent_size), dtype=np.float32)
    grid = np.stack(np.meshgrid(axis, axis[::-1]), axis=-1).reshape(-1, 2)
    z[:, dims[0]], z[:, dims[1]] = grid[:, 0], grid[:, 1]
    mosaic = tile(likelihood.mean(decode(z)), image_shape, steps)
    return save_panels(
        [(f"z[{dims[0]}] →, z[{dims[1]}] ↑", mosaic)], path, f"Latent manifold over [−{extent}, {extent}]²"
    )


def latent_pca(means: np.ndarray, labels: np.ndarray | None, path: Path) -> Path:
    """Latent means projected on their first two principal components, coloured by label."""
    plt = _pyplot()
    centred = means - means.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], color="tab:blue", s=3, alpha=0.7)
    else:
        points = ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab10", s=3, alpha=0.7)
        fig.colorbar(points, ax=ax, label="label")
    ax.set(title="Latent means, first two principal components", xlabel="PC 1", ylabel="PC 2")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def model_pictures(
    encode: Encode,
    decode: Decode,
    x: np.ndarray,
    labels: np.ndarray | None,
    image_shape: tuple[int, ...],
    out_dir: Path,
    seed: int = 0,
    likelihood: Likelihood = BERNOULLI,
    prior: Prior = STANDARD,
) -> list[Path]:
    """The four uses of the model as PNGs in ``out_dir`` (rows that are flat vectors, not
    images, get the latent picture only)."""
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    means, _ = encode_all(encode, x[:5000])
    latent_size = means.shape[1]
    top2 = np.argsort(np.var(means, axis=0))[::-1][:2]
    dims = (int(top2[0]), int(top2[-1])) if latent_size > 1 else (0, 0)
    pca = latent_pca(means, None if labels is None else labels[:5000], out_dir / "latent_pca.png")
    if ImageLayout.of(image_shape) is None:
        return [pca]
    return [
        posterior_predictive(
            encode, decode, x[:64], image_shape, out_dir / "posterior_predictive.png", rng, likelihood
        ),
        prior_predictive(
            decode, latent_size, 64, image_shape, out_dir / "prior_predictive.png", rng, likelihood, prior
        ),
        latent_manifold(
            decode, dims, latent_size, image_shape, out_dir / "latent_manifold.png", likelihood=likelihood
        ),
        pca,
    ]


def learning_curves(
    history: list[dict[str, Any]], costs: list[float], batch_size: int, path: Path, objective: str = "ELBO"
) -> Path:
    """The training objective per epoch (``objective`` names it: the ELBO or an IWAE bound) beside
    the validation ELBO, and the cost of every iteration."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    epochs = [r["epoch"] for r in history]
    left.plot(epochs, [r["train_elbo"] for r in history], "o-", label=f"train ({objective})")
    validation = [(r["epoch"], r["validation_elbo"]) for r in history if r["validation_elbo"] is not None]
    if validation:
        left.plot(*zip(*validation), "s-", label="validation (ELBO)")
    title = "ELBO per epoch" if objective == "ELBO" else "Training objective per epoch"
    left.set(title=f"{title} (nats per image)", xlabel="epoch", ylabel="nats per image")
    left.legend()
    left.grid(alpha=0.3)
    per_image = np.asarray(costs) / batch_size
    right.plot(per_image, lw=0.4, alpha=0.5, label="iteration")
    if len(per_image) > 50:
        window = np.ones(50) / 50
        right.plot(np.arange(49, len(per_image)), np.convolve(per_image, window, "valid"), label="mean of 50")
    cost = f"−{objective.split(' (')[0]} per image"  # "IWAE bound (k = 2)" -> "−IWAE bound per image"
    right.set(title=f"Cost per iteration ({cost})", xlabel="iteration", ylabel="cost", yscale="log")
    right.legend()
    right.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)
    plt.close(fig)
    return path


def save_figure(fig, path: Path) -> None:
    """Written whole and renamed into place, so a picture is never half a PNG (a full disk)."""
    from vaeserve.atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
