"""A Triton Inference Server model repository from an exported version, for teams that run Triton.

``vae export-triton`` writes ``OUT/NAME-encoder`` and ``OUT/NAME-decoder``, each a
``config.pbtxt`` for Triton's onnxruntime backend (dynamic batching on) and
``VERSION/model.onnx``, the version's verified fp32 graph. Triton then serves the graphs
alone: the encoder's mean and stddev, the decoder's logits and probs. Sampling, seeds,
raw uint8 pixels and the reconstruct and sample-prior models are vaeserve's own.

Each version folder appears whole: it is written under a dotted staging name and renamed.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from vaeserve.errors import ExportError
from vaeserve.manifest import ROLES
from vaeserve.repository import ModelVersion
from vaeserve.runtime import CPU, open_session

# onnxruntime's type strings → Triton's model-config data types.
DATA_TYPES = {"tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16", "tensor(uint8)": "TYPE_UINT8"}
CONFIG = "config.pbtxt"


@dataclass(frozen=True)
class TritonExport:
    out: Path
    max_batch_size: int = 4096
    max_queue_delay_us: int = 500
    force: bool = False


def export_triton(version: ModelVersion, request: TritonExport) -> list[Path]:
    """The two Triton model folders written (or updated with this version)."""
    existing = [request.out / f"{version.name}-{role}" / str(version.version) for role in ROLES]
    if not request.force and any(path.exists() for path in existing):
        raise ExportError(
            f"{' and '.join(str(p) for p in existing if p.exists())} exist; pass --force to replace"
        )
    written = []
    for role in ROLES:
        graph = version.graph_path(role)
        name = f"{version.name}-{role}"
        config = model_config(name, graph, request)
        written.append(_write_model(request.out / name, str(version.version), graph, config))
    return written


def model_config(name: str, graph: Path, request: TritonExport) -> str:
    """config.pbtxt (protobuf text format of Triton's ModelConfig) for one ONNX graph."""
    session = open_session(graph, [CPU], threads=1)
    inputs = ",\n".join(_tensor(t) for t in session.get_inputs())
    outputs = ",\n".join(_tensor(t) for t in session.get_outputs())
    return (
        f'name: "{name}"\n'
        'backend: "onnxruntime"\n'
        f"max_batch_size: {request.max_batch_size}\n"
        f"input [\n{inputs}\n]\n"
        f"output [\n{outputs}\n]\n"
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {request.max_queue_delay_us}\n}}\n"
        "instance_group [\n  {\n    count: 1\n    kind: KIND_AUTO\n  }\n]\n"
    )


def _tensor(tensor) -> str:
    """One input or output; the batch dimension is max_batch_size's, so dims start after it."""
    if tensor.type not in DATA_TYPES:
        raise ExportError(f"tensor {tensor.name}: type {tensor.type} has no Triton data type here")
    dims = ", ".join(str(d) if isinstance(d, int) else "-1" for d in tensor.shape[1:])
    fields = f'name: "{tensor.name}"', f"data_type: {DATA_TYPES[tensor.type]}", f"dims: [ {dims} ]"
    return "  {\n" + "".join(f"    {field}\n" for field in fields) + "  }"


def _write_model(folder: Path, version: str, graph: Path, config: str) -> Path:
    target = folder / version
    staging = folder / f".staging-{version}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shutil.copyfile(graph, staging / "model.onnx")
    _replace_file(folder / CONFIG, config)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return folder


def _replace_file(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(text)
    partial.replace(path)
