"""`vae export-triton`: a Triton model repository from an exported version, parsed with Triton's
own model-config schema (tritonclient's model_config_pb2) and checked against the graphs."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cli import assert_one_line_error, vae

from vaeserve.repository import resolve, sha256_file
from vaeserve.runtime import CPU, open_session

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")


def parse(path: Path):
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_the_configs_parse_and_match_the_graphs(repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "triton"
    result = vae("export-triton", "--repo", str(repo), "--name", "tiny", "--out", str(out))
    assert result.returncode == 0, result.stderr
    version = resolve(repo, "tiny")
    fp32 = model_config_pb2.DataType.Value("TYPE_FP32")
    for role in ("encoder", "decoder"):
        config = parse(out / f"tiny-{role}" / "config.pbtxt")
        graph = out / f"tiny-{role}" / "1" / "model.onnx"
        assert sha256_file(graph) == version.manifest.graphs[role].sha256
        assert (config.name, config.backend, config.max_batch_size) == (f"tiny-{role}", "onnxruntime", 4096)
        assert config.dynamic_batching.max_queue_delay_microseconds == 500
        session = open_session(graph, [CPU])
        for declared, actual in (
            (config.input, session.get_inputs()),
            (config.output, session.get_outputs()),
        ):
            assert [(t.name, list(t.dims), t.data_type) for t in declared] == [
                (t.name, list(t.shape[1:]), fp32) for t in actual
            ]
    assert [t.name for t in parse(out / "tiny-decoder" / "config.pbtxt").output] == ["logits", "probs"]


def test_an_existing_version_is_kept_unless_forced(repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "triton"
    common = ("export-triton", "--repo", str(repo), "--name", "tiny", "--out", str(out))
    assert vae(*common, "--max-batch-size", "64").returncode == 0
    assert_one_line_error(vae(*common), 1, "tiny-encoder/1", "pass --force")
    assert parse(out / "tiny-encoder" / "config.pbtxt").max_batch_size == 64
    assert vae(*common, "--force").returncode == 0
    assert parse(out / "tiny-encoder" / "config.pbtxt").max_batch_size == 4096
    assert sorted(p.name for p in (out / "tiny-encoder").iterdir()) == [
        "1",
        "config.pbtxt",
    ]  # no staging left
    assert_one_line_error(
        vae(*common[:-2], "--name", "nothing", "--out", str(out)), 1, "no versions of model"
    )
    assert_one_line_error(vae(*common, "--max-batch-size", "0"), 1, "--max-batch-size")
