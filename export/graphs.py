"""The VAE as two ONNX graphs.

Exporter: torch.onnx's dynamo exporter (``dynamo=True``), opset 18. With torch
2.13 it is the default and maintained path (the TorchScript exporter is
deprecated since torch 2.9), it exports a ``torch.export`` program, so the graphs
hold only the inference ops (Gemm, Relu, Split, Softplus, Sigmoid: no dropout,
no training-mode nodes), and 18 is its native opset, so no version conversion
runs; onnxruntime ≥ 1.14 and its quantizer support it fully.
Sampling stays out of the graphs: the service draws ε and Bernoulli samples
itself, seeded, so results are reproducible on every runtime.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch
from torch import nn

from vaeserve import __version__
from vaeserve.errors import ExportError
from vaeserve.training.likelihoods import likelihood_mean
from vaeserve.training.model import VAE

OPSET = 18
# The torch releases the dynamo exporter is tested with here (pyproject's train extra pins the
# same): on torch 2.11 with onnx 1.23, ONNX shape inference failed on the encoder ("Inferred
# shape and existing shape differ in dimension 0").
TESTED_TORCH = ("2.13",)


def check_torch() -> None:
    """An untested torch is one line naming the tested releases, not a shape-inference failure."""
    release = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    if release not in TESTED_TORCH:
        raise ExportError(
            f"vae export is tested with torch {', '.join(TESTED_TORCH)}; this is torch {torch.__version__} "
            f"(pip install torch=={TESTED_TORCH[-1]}.0, the CPU build: see the README)"
        )


ENCODER_IO = (["x"], ["mean", "stddev"])
DECODER_IO = (["z"], ["logits", "probs"])


class EncoderGraph(nn.Module):
    """x [batch, *row] → mean, stddev [batch, M]; a row as the architecture's graphs take it,
    [D] or an image [C, H, W] (vaeserve.layout)."""

    def __init__(self, model: VAE) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode(x.flatten(1))


class DecoderGraph(nn.Module):
    """z [batch, M] → logits [batch, P·D] (images: [batch, P·C, H, W]), the likelihood's P
    parameters of each value, and probs [batch, *row], E[x|z] under the model's likelihood
    (sigmoid(logits) for the Bernoulli)."""

    def __init__(self, model: VAE) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        params = self.model.decode(z)
        probs = likelihood_mean(params, self.model.likelihood)
        row = self.model.row_shape
        if len(row) == 1:
            return params, probs
        return params.reshape(-1, params.shape[1] // (row[1] * row[2]), *row[1:]), probs.reshape(-1, *row)


def export_graph(
    module: nn.Module,
    row: tuple[int, ...],
    io: tuple[list[str], list[str]],
    path: Path,
    metadata: dict[str, str],
) -> onnx.ModelProto:
    """Export ``module`` with a dynamic batch dimension, stamp metadata, save to ``path``."""
    batch = torch.export.Dim("batch", min=1)
    return export_module(module, (torch.zeros(2, *row),), io, ({0: batch},), path, metadata)


def export_module(
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    io: tuple[list[str], list[str]],
    dynamic_shapes: tuple[dict, ...],
    path: Path,
    metadata: dict[str, str],
) -> onnx.ModelProto:
    """Export ``module`` traced on ``example`` with the ``dynamic_shapes`` of torch.export (batch,
    and for image autoencoders height and width), stamp metadata, save to ``path``."""
    with warnings.catch_warnings(), _quiet_torch_onnx():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module.eval(),
            example,
            None,
            dynamo=True,
            opset_version=OPSET,
            input_names=io[0],
            output_names=io[1],
            dynamic_shapes=dynamic_shapes,
            verbose=False,
        )
    proto = program.model_proto
    proto.producer_name = "vaeserve"
    proto.producer_version = __version__
    onnx.helper.set_model_props(proto, metadata)
    onnx.save_model(proto, path)
    return proto


def export_pair(model: VAE, folder: Path, metadata: dict[str, str]) -> tuple[Path, Path]:
    encoder, decoder = folder / "encoder.onnx", folder / "decoder.onnx"
    export_graph(EncoderGraph(model), model.row_shape, ENCODER_IO, encoder, {**metadata, "role": "encoder"})
    export_graph(
        DecoderGraph(model), (model.latent_size,), DECODER_IO, decoder, {**metadata, "role": "decoder"}
    )
    return encoder, decoder


def io_signature(proto: onnx.ModelProto) -> dict[str, list[dict]]:
    """Names, dtypes and shapes (dimension names for dynamic ones) of a graph's inputs and outputs."""

    def describe(values) -> list[dict]:
        described = []
        for value in values:
            tensor = value.type.tensor_type
            shape = [d.dim_param or d.dim_value for d in tensor.shape.dim]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
            described.append({"name": value.name, "dtype": dtype, "shape": shape})
        return described

    return {"inputs": describe(proto.graph.input), "outputs": describe(proto.graph.output)}


@contextlib.contextmanager
def _quiet_torch_onnx() -> Iterator[None]:
    """The exporter logs warnings about optional torchvision ops; they concern no graph of ours."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
