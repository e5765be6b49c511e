"""An exported encoder/decoder pair on onnxruntime, CPU or CUDA.

The one place that opens ONNX sessions: the export checks, ``vae evaluate
--model``, the service and the embedding tool all run a model through
``OnnxPair``.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np

from vaeserve.errors import RepositoryError, VaeError, first_line
from vaeserve.repository import ModelVersion

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity, narrowed by a cgroup CPU quota (a container
    limited to 2 CPUs on a 64-core host sees all 64 in its affinity, and gets 2)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


# cgroup v2's single file, then v1's pair: "max" or -1 mean no quota.
CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1 = (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))


def cgroup_cpu_quota() -> float | None:
    """CPUs' worth of time this container may use per period, or None without a limit."""
    try:
        if CGROUP_V2.exists():
            quota, period = CGROUP_V2.read_text().split()[:2]
        else:
            quota, period = (path.read_text().strip() for path in CGROUP_V1)
        if quota in ("max", "-1"):
            return None
        return int(quota) / int(period)
    except (OSError, ValueError):
        return None


def choose_providers(device: str) -> list[str]:
    """``cuda`` demands CUDA; ``auto`` takes it when onnxruntime-gpu and a GPU are present."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return [CPU]
    if CUDA in available:
        return [CUDA, CPU]
    if device == "cuda":
        raise VaeError(
            f"--device cuda, but onnxruntime offers only {available} (install onnxruntime-gpu "
            "and check the GPU driver)"
        )
    return [CPU]


def session_options(threads: int = 0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Idle intra-op threads would spin for a while after each run, taking a core from the
    # gRPC threads and from clients on small machines; they sleep instead.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


# CUDA runs float32 graphs in float32: onnxruntime's default lets Ampere and later GPUs multiply
# in TF32, whose 10-bit mantissa moved the H100's encoder means 2.6e-3 from the CPU's on the
# seed model (a probe on the lent GPU); the fp16 variant is the fast, lower-precision choice.
PROVIDER_OPTIONS = {CUDA: {"use_tf32": "0"}}


def open_session(path: Path, providers: list[str], threads: int = 0):
    import onnxruntime as ort

    options = [PROVIDER_OPTIONS.get(name, {}) for name in providers]
    try:
        return ort.InferenceSession(
            str(path), session_options(threads), providers=providers, provider_options=options
        )
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad graphs
        raise RepositoryError(f"{path}: onnxruntime cannot load it ({first_line(exc)})") from None


class OnnxPair:
    """The encoder and decoder sessions of one exported model (or of loose graph files)."""

    def __init__(
        self, encoder: Path, decoder: Path, providers: list[str] | None = None, threads: int = 0
    ) -> None:
        self.encoder = open_session(encoder, providers or [CPU], threads)
        self.decoder = open_session(decoder, providers or [CPU], threads)
        self.provider = self.encoder.get_providers()[0]
        # One row as the encoder takes it: [D], or an image [C, H, W] (vaeserve.layout). Rows
        # everywhere else are flat [N, D], channels first: the graph's shapes are views of them.
        self.row_shape = tuple(int(d) for d in self.encoder.get_inputs()[0].shape[1:])
        self.input_size = math.prod(self.row_shape)
        self.latent_size = int(self.decoder.get_inputs()[0].shape[-1])

    @classmethod
    def load(
        cls, model: ModelVersion, device: str = "cpu", threads: int = 0, variant: str = "fp32"
    ) -> OnnxPair:
        pair = cls(
            model.graph_path("encoder", variant),
            model.graph_path("decoder", variant),
            choose_providers(device),
            threads,
        )
        if (pair.input_size, pair.latent_size) != (model.input_size, model.latent_size):
            raise RepositoryError(
                f"{model.path}: graphs take D={pair.input_size}, M={pair.latent_size} but the "
                f"manifest says D={model.input_size}, M={model.latent_size}"
            )
        return pair

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Latent mean and stddev [N, M] of float32 inputs [N, D]."""
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, *self.row_shape)
        mean, stddev = self.encoder.run(None, {"x": x})
        return mean, stddev

    def decode(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The likelihood's parameters [N, P·D] (Bernoulli logits) and E[x|z] [N, D] of latents
        [N, M], as rows."""
        logits, probs = self.decoder.run(None, {"z": np.ascontiguousarray(z, dtype=np.float32)})
        return logits.reshape(len(logits), -1), probs.reshape(len(probs), -1)

    def decode_logits(self, z: np.ndarray) -> np.ndarray:
        return self.decode(z)[0]


# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range.
LOGVAR_RANGE = (-30.0, 20.0)


def autoencoder_inputs(images: np.ndarray) -> np.ndarray:
    """An imported autoencoder's inputs: uint8 p → p / 127.5 − 1, as diffusers' image processor
    normalises; float as is (float32)."""
    if images.dtype == np.uint8:
        return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return np.ascontiguousarray(images, dtype=np.float32)


class AutoencoderGraphs:
    """An imported latent-diffusion autoencoder's two graphs (``vae import --diffusers``), run as
    diffusers runs the model with ``enable_tiling()``: the service, ``vae embed`` and the
    benchmarks encode and decode through this."""

    def __init__(
        self, model: ModelVersion, device: str = "cpu", threads: int = 0, variant: str = "fp32"
    ) -> None:
        record = model.manifest.autoencoder
        if record is None:
            raise RepositoryError(f"{model.path}: a VAE trained by vae train, not an imported autoencoder")
        self.record = record
        providers = choose_providers(device)
        self.encoder = open_session(model.graph_path("encoder", variant), providers, threads)
        self.decoder = open_session(model.graph_path("decoder", variant), providers, threads)
        self.provider = self.encoder.get_providers()[0]

    def encode(self, images: np.ndarray, tiling) -> tuple[np.ndarray, np.ndarray]:
        """The latent distribution's mean and stddev of images [N, C, H, W] (uint8, or float32 in
        [−1, 1]); an AutoencoderKL's tiles blend its moments, the stddev derived after, as in
        diffusers."""
        x = autoencoder_inputs(images)
        if self.record.stochastic:
            mean, logvar = tiling.encode(_runner(self.encoder, ["mean", "logvar"]), x)
            return mean, np.exp(np.float32(0.5) * np.clip(logvar, *LOGVAR_RANGE))
        mean, stddev = tiling.encode(_runner(self.encoder, ["mean", "stddev"]), x)
        return mean, stddev

    def decode(self, latents: np.ndarray, tiling) -> np.ndarray:
        """Images [N, 3, f·h, f·w] of the autoencoder's own latents [N, C, h, w]."""
        return tiling.decode(_runner(self.decoder, None), latents)[0]

    def to_pipeline(self, z: np.ndarray) -> np.ndarray:
        """The autoencoder's latents as a pipeline has them: (z − shift) · scale."""
        return (z - np.float32(self.record.shift_factor)) * np.float32(self.record.scaling_factor)

    def from_pipeline(self, z: np.ndarray) -> np.ndarray:
        return z / np.float32(self.record.scaling_factor) + np.float32(self.record.shift_factor)

    def pipeline_encoding(self, encoding: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Encode's outputs (mean, stddev, z) as a pipeline's: latents shifted and scaled, the
        stddev scaled only."""
        scale = np.float32(self.record.scaling_factor)
        return {k: v * scale if k == "stddev" else self.to_pipeline(v) for k, v in encoding.items()}


def _runner(session, names: list[str] | None):
    """A session as a function of its one input (a whole image or latent, or a tile of one)."""
    feed = session.get_inputs()[0].name

    def run(part: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(session.run(names, {feed: np.ascontiguousarray(part, dtype=np.float32)}))

    return run
