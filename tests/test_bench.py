"""`vae bench` against the real server: every protocol, the table and JSON, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import servers
from test_cli import assert_one_line_error, vae


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory):
    with servers.running(
        repo, tmp_path_factory.mktemp("bench") / "serve.log", "--max-request-rows", "64"
    ) as up:
        yield up


@pytest.mark.parametrize("protocol", ["v1", "oip-grpc", "oip-http"])
def test_every_protocol_measures_every_cell(server, protocol: str) -> None:
    target = server.http if protocol == "oip-http" else server.target
    common = ("bench", "--target", target, "--protocol", protocol, "--model", "tiny", "--seconds", "0.3")
    result = vae(*common, "--batch", "1,16", "--concurrency", "1,2", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    cells = {(c["batch"], c["concurrency"]): c for c in report["cells"]}
    assert set(cells) == {(1, 1), (1, 2), (16, 1), (16, 2)} and report["model"] == "tiny"
    for (batch, _), cell in cells.items():
        assert cell["calls_per_s"] > 0 and cell["rows_per_s"] == pytest.approx(batch * cell["calls_per_s"])
        assert 0 < cell["p50_ms"] <= cell["p90_ms"] <= cell["p99_ms"] and cell["errors"] == {}
        assert 0 < cell["load_cpu_cores"] < 4
    table = vae(*common, "--batch", "4", "--concurrency", "1", "--dtype", "float32")
    assert table.returncode == 0 and "p99 ms" in table.stdout and "load CPU" in table.stdout


def test_shared_memory_and_the_default_model(server) -> None:
    result = vae("bench", "--target", server.target, "--shared-memory", "--batch", "8", "--concurrency", "1")
    assert result.returncode == 1 and "FAILED_PRECONDITION" in result.stderr  # the server runs without it
    default = vae(
        "bench", "--target", server.target, "--batch", "2", "--concurrency", "1", "--seconds", "0.2"
    )
    assert default.returncode == 0 and "model tiny" in default.stdout


def test_bad_targets_and_flags_are_one_line_errors(server) -> None:
    assert_one_line_error(
        vae("bench", "--target", "127.0.0.1:1", "--seconds", "0.2"), 1, "cannot ask 127.0.0.1:1"
    )
    http = ("bench", "--target", "127.0.0.1:1", "--protocol", "oip-http", "--model", "tiny")
    assert_one_line_error(vae(*http), 1, "cannot read http://127.0.0.1:1/v2/models/tiny-encoder")
    assert_one_line_error(vae("bench", "--target", server.http, "--protocol", "oip-http"), 1, "needs --model")
    unknown = vae("bench", "--target", server.target, "--protocol", "oip-grpc", "--model", "nothing")
    assert_one_line_error(unknown, 1, "nothing-encoder's metadata: NOT_FOUND")
    too_many = vae(
        "bench", "--target", server.target, "--batch", "65", "--concurrency", "1", "--seconds", "0.2"
    )
    assert_one_line_error(too_many, 1, "INVALID_ARGUMENT", "limit of 64")
    assert_one_line_error(vae("bench", "--target", server.target, "--batch", "0"), 1, "--batch '0'")
    assert_one_line_error(
        vae("bench", "--target", server.target, "--protocol", "oip-grpc", "--shared-memory"), 1, "goes with"
    )
