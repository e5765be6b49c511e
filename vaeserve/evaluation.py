"""Honest evaluation of any encoder/decoder pair, in numpy.

The same code scores a PyTorch checkpoint and an exported ONNX pair: each
backend only supplies ``encode(x) -> (mean, stddev)`` and ``decode(z) -> logits``.
With the same seed both see the same ε, so their numbers differ only by the
networks' arithmetic.

Metrics (Burda et al., 2016, §5): the ELBO with its reconstruction and KL parts,
the importance-sampled negative log-likelihood NLL_k = −log (1/k) Σ_i p(x, z_i)/q(z_i|x)
with the encoder as proposal, and the active units of Burda et al. (Cov_x E_q[z] > 1e-2).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vaeserve.atomic import atomic_path, atomic_write_text
from vaeserve.elbo import gaussian_kl, logmeanexp
from vaeserve.errors import ConfigError
from vaeserve.likelihoods import BERNOULLI, Likelihood
from vaeserve.prior import STANDARD, Prior

Encode = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
Decode = Callable[[np.ndarray], np.ndarray]

ACTIVE_UNIT_THRESHOLD = 1e-2
# Values of the decoder's output per block (rows × D × the likelihood's parameters per value):
# 16,384 rows of 784 Bernoulli logits, 51 MB of float32, so a few such arrays keep memory
# bounded whatever k, the row's size and the split size are.
BLOCK_VALUES = 16_384 * 784
# Rows per run of a graph: a conv network's activations are channels × H × W per row (32 × 28 × 28
# floats, 100 KB, at its first stage), so 16,384 rows at once held gigabytes per layer and a conv
# MNIST model's export was killed for memory; an MLP's runs cost the same in these pieces.
GRAPH_ROWS = 1024
# numpy and the runtimes release the GIL, so blocks overlap on the machine's cores.
WORKERS = 2


@dataclass(frozen=True)
class Evaluation:
    """Per-image means (nats) over a split; stderr is the standard error over images."""

    rows: int
    elbo: float
    elbo_stderr: float
    reconstruction: float
    kl: float
    nll: float
    nll_stderr: float
    iw_samples: int
    active_units: int
    latent_size: int
    seconds: float
    # Var over rows of each latent dimension's posterior mean (Burda et al. 2016's activity
    # statistic, of which active_units counts those above the threshold): the traversal order.
    unit_activity: list[float] = field(default_factory=list)
    # NLL per value in bits, NLL / (D · ln 2): the figure image models are compared by.
    nll_bits_per_dim: float = 0.0
    # Rows whose scores were read back from a score folder (--scores) rather than computed now.
    rows_read_back: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def encode_all(encode: Encode, x: np.ndarray, rows: int = GRAPH_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Latent means and stddevs of every row, computed in chunks."""
    parts = [encode(x[i : i + rows]) for i in range(0, len(x), rows)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def unit_activity(means: np.ndarray) -> np.ndarray:
    return np.var(means.astype(np.float64), axis=0)


def active_units(means: np.ndarray) -> int:
    return int(np.sum(unit_activity(means) > ACTIVE_UNIT_THRESHOLD))


def importance_weights(
    decode: Decode,
    x: np.ndarray,
    mean: np.ndarray,
    stddev: np.ndarray,
    eps: np.ndarray,
    likelihood: Likelihood = BERNOULLI,
    prior: Prior = STANDARD,
) -> tuple[np.ndarray, np.ndarray]:
    """log p(x|z_i) and log p(x, z_i)/q(z_i|x) for z_i = mean + stddev·ε_i; shapes [B, k]."""
    z = mean[:, None, :] + stddev[:, None, :] * eps
    batch, k, latent = z.shape
    flat = z.reshape(batch * k, latent)
    logits = np.concatenate([decode(flat[i : i + GRAPH_ROWS]) for i in range(0, len(flat), GRAPH_ROWS)])
    logits = logits.reshape(batch, k, -1)
    log_px_z = likelihood.log_prob(x[:, None, :], logits)
    return log_px_z, log_px_z + prior.log_ratio(z, eps, stddev)


@dataclass(frozen=True)
class RowScores:
    """Per row (nats): the ELBO (its reconstruction part averaged over the k draws, the KL
    exact under N(0, I), else averaged over the same draws: a mixture's has no closed form),
    and log p(x) ≥ log (1/k) Σ_i p(x, z_i)/q(z_i|x), the importance-weighted bound."""

    elbo: np.ndarray
    reconstruction: np.ndarray
    kl: np.ndarray
    log_px: np.ndarray
    means: np.ndarray


def score_rows(
    encode: Encode,
    decode: Decode,
    x: np.ndarray,
    iw_samples: int = 5000,
    seed: int | None = 0,
    progress: bool = False,
    likelihood: Likelihood = BERNOULLI,
    first_row: int = 0,
    prior: Prior = STANDARD,
    checkpoint: Callable[[], None] | None = None,
) -> RowScores:
    """Every row's bounds, in blocks of bounded memory. Row i's ε comes from its own generator,
    seeded by (seed, first_row + i): a dataset scored whole, in chunks, resumed, or through
    the service gets the same scores. ``seed`` None: fresh randomness. ``checkpoint`` is called
    before each wave of blocks and raises to stop the work there (the service's abandoned calls)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    means, stddevs = encode_all(encode, x)
    seed = np.random.SeedSequence().entropy if seed is None else seed
    reconstruction, nll, log_ratio = np.empty(len(x)), np.empty(len(x)), np.empty(len(x))
    block_rows = max(1, BLOCK_VALUES // (x.shape[1] * likelihood.params_per_value))
    images_per_block = max(1, block_rows // iw_samples)
    samples_per_block = min(iw_samples, block_rows)
    bar = tqdm(total=len(x), desc="score", unit="row", disable=None if progress else True, leave=False)
    blocks = [slice(s, min(s + images_per_block, len(x))) for s in range(0, len(x), images_per_block)]
    draw = functools.partial(_draw, seed, first_row, iw_samples, samples_per_block, means.shape[1])
    with ThreadPoolExecutor(WORKERS) as pool:
        for wave in range(0, len(blocks), WORKERS):
            if checkpoint is not None:
                checkpoint()
            jobs = [(rows, draw(rows)) for rows in blocks[wave : wave + WORKERS]]
            futures = [
                pool.submit(_block_bounds, decode, x[r], means[r], stddevs[r], eps, likelihood, prior)
                for r, eps in jobs
            ]
            for (rows, _), future in zip(jobs, futures):
                reconstruction[rows], nll[rows], log_ratio[rows] = future.result()
                bar.update(len(x[rows]))
    bar.close()
    if prior.means is None:
        kl = gaussian_kl(means.astype(np.float64), stddevs.astype(np.float64))
    else:
        kl = -log_ratio
    return RowScores(reconstruction - kl, reconstruction, kl, -nll, means)


def evaluate(
    encode: Encode,
    decode: Decode,
    x: np.ndarray,
    iw_samples: int = 5000,
    seed: int = 0,
    progress: bool = False,
    likelihood: Likelihood = BERNOULLI,
    prior: Prior = STANDARD,
    first_row: int = 0,
    scores: ScoreFolder | None = None,
) -> Evaluation:
    """ELBO, NLL_k and active units of the pair on the (binarized) rows ``x``, the split's rows
    from ``first_row`` on: the means of `score_rows`. With ``scores``, each chunk of rows is
    kept there as it is scored and a chunk already there is read back instead of scored."""
    started = time.perf_counter()
    if scores is None:
        rows = score_rows(encode, decode, x, iw_samples, seed, progress, likelihood, first_row, prior)
    else:
        rows = scores.scored(
            lambda a, b: score_rows(
                encode, decode, x[a:b], iw_samples, seed, False, likelihood, first_row + a, prior
            ),
            len(x),
            progress,
        )
    elbo, nll = rows.elbo, -rows.log_px
    return Evaluation(
        rows=len(elbo),
        elbo=float(elbo.mean()),
        elbo_stderr=float(elbo.std() / np.sqrt(len(elbo))),
        reconstruction=float(rows.reconstruction.mean()),
        kl=float(rows.kl.mean()),
        nll=float(nll.mean()),
        nll_stderr=float(nll.std() / np.sqrt(len(elbo))),
        iw_samples=iw_samples,
        active_units=active_units(rows.means),
        latent_size=int(rows.means.shape[1]),
        seconds=time.perf_counter() - started,
        unit_activity=[round(float(v), 6) for v in unit_activity(rows.means)],
        nll_bits_per_dim=float(nll.mean() / (x.shape[1] * np.log(2.0))),
        rows_read_back=0 if scores is None else scores.read_back,
    )


# Rows per file of a score folder: at k = 5,000 a chunk of MNIST digits is a few minutes' work,
# so an interrupted evaluation loses at most that.
SCORE_CHUNK_ROWS = 100


class ScoreFolder:
    """Each row's scores of one evaluation (``vae evaluate --scores DIR``), kept as they are
    computed: a record of what is evaluated (``identity``: the model's graphs or checkpoint, the
    dataset, split and rows, k) and a file per chunk of rows. Rows are seeded by their own
    number, so chunks scored in other runs add up to the whole evaluation; a rerun reads back the
    chunks there and scores the rest. A folder that holds another evaluation's scores is refused,
    never mixed in."""

    RECORD = "evaluation.json"

    def __init__(self, folder: Path, identity: dict, chunk_rows: int = SCORE_CHUNK_ROWS) -> None:
        self.folder = folder
        self.identity = {**identity, "chunk_rows": chunk_rows}
        self.chunk_rows = chunk_rows
        self.read_back = 0  # rows whose scores this run read back instead of computing

    def scored(self, score: Callable[[int, int], RowScores], rows: int, progress: bool) -> RowScores:
        """Every row's scores: each chunk read back if it is there, else ``score(a, b)`` and kept."""
        self._claim()
        parts: list[RowScores] = []
        with tqdm(
            total=rows, desc="score", unit="row", disable=None if progress else True, leave=False
        ) as bar:
            for start in range(0, rows, self.chunk_rows):
                stop = min(rows, start + self.chunk_rows)
                part = self._read(start, stop)
                if part is None:
                    part = score(start, stop)
                    self._write(start, part)
                else:
                    self.read_back += stop - start
                parts.append(part)
                bar.update(stop - start)
        return RowScores(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in RowScores.__dataclass_fields__)
        )

    def _claim(self) -> None:
        record = self.folder / self.RECORD
        if record.exists():
            try:
                found = json.loads(record.read_text())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"--scores {self.folder}: unreadable {self.RECORD} ({exc})") from None
            if found != self.identity:
                differs = sorted(k for k in {*found, *self.identity} if found.get(k) != self.identity.get(k))
                said = ", ".join(f"{k} {found.get(k)!r} there, {self.identity.get(k)!r} now" for k in differs)
                raise ConfigError(
                    f"--scores {self.folder} holds another evaluation's scores ({said}); give an empty "
                    "or new folder, or the same evaluation's arguments to resume it"
                )
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record, json.dumps(self.identity, indent=2, sort_keys=True))

    def _path(self, start: int) -> Path:
        return self.folder / f"rows-{start:07d}.npz"

    def _read(self, start: int, stop: int) -> RowScores | None:
        path = self._path(start)
        if not path.exists():
            return None
        try:
            with np.load(path) as stored:
                part = RowScores(**{f: stored[f] for f in RowScores.__dataclass_fields__})
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(
                f"--scores {path}: unreadable ({exc}); delete it to score its rows again"
            ) from None
        if len(part.log_px) != stop - start:
            raise ConfigError(f"--scores {path}: {len(part.log_px)} rows, expected {stop - start}")
        return part

    def _write(self, start: int, part: RowScores) -> None:
        with atomic_path(self._path(start)) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, **asdict(part))


def _draw(seed: int, first_row: int, k: int, per_call: int, latent: int, rows: slice) -> list[np.ndarray]:
    """ε [rows, ≤ per_call, latent] for a block, in pieces of at most ``per_call`` samples so
    memory stays bounded even when one row's k samples exceed a block; each row's generator
    draws its pieces in turn, so the pieces do not change the draws."""
    generators = [np.random.default_rng((seed, first_row + i)) for i in range(rows.start, rows.stop)]
    return [
        np.stack([g.standard_normal((min(per_call, k - done), latent), dtype=np.float32) for g in generators])
        for done in range(0, k, per_call)
    ]


def _block_bounds(
    decode: Decode,
    x: np.ndarray,
    mean: np.ndarray,
    stddev: np.ndarray,
    eps_parts: list[np.ndarray],
    likelihood: Likelihood,
    prior: Prior,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image: the mean of log p(x|z_i), NLL_k = −logmeanexp of the log weights, and the
    mean of log p(z_i)/q(z_i|x) (−KL, estimated)."""
    parts = [importance_weights(decode, x, mean, stddev, eps, likelihood, prior) for eps in eps_parts]
    log_px_z = np.concatenate([p[0] for p in parts], axis=1)
    log_w = np.concatenate([p[1] for p in parts], axis=1).astype(np.float64)
    return log_px_z.mean(axis=1), -logmeanexp(log_w, axis=1), (log_w - log_px_z).mean(axis=1)
