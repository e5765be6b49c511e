"""Smaller and faster variants of an exported pair, each measured against fp32.

int8: onnxruntime's dynamic quantization (weights int8, activations quantized
per batch at run time) for CPU. fp16: weights and arithmetic in float16 with
float32 inputs and outputs kept (``keep_io_types``), for CUDA; the API contract
(float32 tensors) is the same for every variant.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from vaeserve.errors import ExportError
from vaeserve.evaluation import evaluate
from vaeserve.likelihoods import Likelihood
from vaeserve.repository import file_record
from vaeserve.runtime import OnnxPair

VARIANTS = ("int8", "fp16")
CHANGE_SEED = 0


# Variants an architecture's graphs gain nothing from, and why (measured, docs/benchmarks.md).
UNSUITED = {
    ("conv", "int8"): (
        "onnxruntime's dynamic quantization runs convolutions as ConvInteger, 6.5x slower than "
        "fp32 on CPU (342 vs 2,223 rows/s encoding 32x32 colour at batch 64); serve conv models "
        "in fp32, or fp16 on CUDA"
    ),
}


def check_for(architecture: str, chosen: tuple[str, ...]) -> None:
    """One line, before any work, for a variant the architecture's graphs would only slow."""
    for variant in chosen:
        why = UNSUITED.get((architecture, variant))
        if why:
            raise ExportError(f"--variants {variant}: not built for the {architecture} architecture: {why}")


def build(variant: str, source: Path, target: Path) -> None:
    if variant == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        logging.getLogger("root").setLevel(logging.ERROR)  # the quantizer logs advice we follow
        quantize_dynamic(source, target, weight_type=QuantType.QInt8)
    else:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        proto = convert_float_to_float16(onnx.load(source), keep_io_types=True)
        onnx.save_model(proto, target)
    _copy_metadata(source, target, variant)


def _copy_metadata(source: Path, target: Path, variant: str) -> None:
    props = {p.key: p.value for p in onnx.load(source).metadata_props}
    proto = onnx.load(target)
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {**props, "variant": variant})
    onnx.save_model(proto, target)


def measure(
    variant: str, folder: Path, reference: OnnxPair, x_test: np.ndarray, likelihood: Likelihood
) -> dict[str, Any]:
    """Files, parity with fp32 and change in test ELBO (same ε, so the change is paired)."""
    encoder, decoder = folder / f"encoder.{variant}.onnx", folder / f"decoder.{variant}.onnx"
    pair = OnnxPair(encoder, decoder)
    rng = np.random.default_rng(CHANGE_SEED)
    z = rng.standard_normal((1000, reference.latent_size), dtype=np.float32)
    x = x_test[:1000]
    diffs = {
        "mean": float(np.abs(pair.encode(x)[0] - reference.encode(x)[0]).max()),
        "stddev": float(np.abs(pair.encode(x)[1] - reference.encode(x)[1]).max()),
        "probs": float(np.abs(pair.decode(z)[1] - reference.decode(z)[1]).max()),
    }
    ours, base = (
        evaluate(p.encode, p.decode_logits, x_test, iw_samples=1, seed=CHANGE_SEED, likelihood=likelihood)
        for p in (pair, reference)
    )
    return {
        "encoder": file_record(encoder).to_dict(),
        "decoder": file_record(decoder).to_dict(),
        "device": "cpu" if variant == "int8" else "cuda",
        "max_abs_diff_vs_fp32": diffs,
        "test_elbo": ours.elbo,
        "test_elbo_change": ours.elbo - base.elbo,
        "elbo_rows": ours.rows,
    }
