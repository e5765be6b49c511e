"""OIP's model repository extension on the real server, called by tritonclient and by plain HTTP:
index, load and unload behind the operators' admin token."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import servers
from test_cli import assert_one_line_error, vae

pytest.importorskip("tritonclient.grpc", reason="tritonclient is installed by make setup")
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

CLIENT, ADMIN = "client-s3cret", "admin-s3cret"


def post(
    server: servers.Server, path: str, token: str | None, body: dict | None = None
) -> tuple[int, object]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = json.dumps(body).encode() if body is not None else b""
    request = urllib.request.Request(f"http://{server.http}{path}", data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def encode_code(server: servers.Server, token: str) -> grpc.StatusCode:
    client = grpcclient.InferenceServerClient(server.target)
    x = grpcclient.InferInput("x", [1, 784], "UINT8")
    x.set_data_from_numpy(np.zeros((1, 784), np.uint8))
    try:
        client.infer("tiny-encoder", [x], headers={"authorization": f"Bearer {token}"})
    except InferenceServerException as error:
        return error.status()
    finally:
        client.close()
    return "OK"


@pytest.fixture()
def tokens(tmp_path: Path) -> list[str]:
    (tmp_path / "token").write_text(CLIENT + "\n")
    (tmp_path / "admin").write_text(ADMIN + "\n")
    return ["--token-file", str(tmp_path / "token"), "--admin-token-file", str(tmp_path / "admin")]


def test_operators_unload_and_load_models_with_the_admin_token(repo: Path, tmp_path: Path, tokens) -> None:
    models = tmp_path / "models"
    shutil.copytree(repo, models)
    flags = (*tokens, "--workers", "1", "--poll-s", "0.2")
    with servers.running(models, tmp_path / "serve.log", *flags, client={"token": CLIENT}) as server:
        assert post(server, "/v2/repository/index", None)[0] == 401
        status, body = post(server, "/v2/repository/index", CLIENT)  # the clients' token is not enough
        assert status == 401 and "admin token" in body["error"]
        assert post(server, "/v2/repository/index", ADMIN) == (
            200,
            [{"name": "tiny", "version": "1", "state": "READY", "reason": ""}],
        )
        admin = {"authorization": f"Bearer {ADMIN}"}
        http = httpclient.InferenceServerClient(server.http)
        http.unload_model("tiny", headers=admin)  # tritonclient's own calls
        assert http.get_model_repository_index(headers=admin) == [
            {"name": "tiny", "version": "1", "state": "UNLOADED", "reason": "unloaded by an operator"}
        ]
        assert encode_code(server, CLIENT) == "StatusCode.NOT_FOUND"
        # A model added now is loaded by a poll: once it answers, polls have run since the
        # unload, and the unloaded model must still be out.
        servers.add_model(models, "tiny", "later", tmp_path)
        client_headers = {"authorization": f"Bearer {CLIENT}"}
        loaded = lambda: http.is_model_ready("later-encoder", headers=client_headers)  # noqa: E731
        servers.until(loaded, 30, "a poll loading later")
        assert encode_code(server, CLIENT) == "StatusCode.NOT_FOUND"  # stays unloaded, polls included
        grpc_admin = grpcclient.InferenceServerClient(server.target)
        grpc_admin.load_model("tiny", headers=admin)
        index = grpc_admin.get_model_repository_index(headers=admin, as_json=True)["models"]
        index = grpc_admin.get_model_repository_index(headers=admin, as_json=True)["models"]
        assert [(m["name"], m["version"], m["state"]) for m in index] == [
            ("later", "1", "READY"),
            ("tiny", "1", "READY"),
        ]
        assert encode_code(server, CLIENT) == "OK"
        assert encode_code(server, ADMIN) == "StatusCode.UNAUTHENTICATED"  # operators do not infer
        with pytest.raises(InferenceServerException) as unknown:
            grpc_admin.load_model("nope", headers=admin)
        assert (
            unknown.value.status() == "StatusCode.NOT_FOUND"
            and "not in the repository" in unknown.value.message()
        )
        status, body = post(server, "/v2/repository/models/tiny/load", ADMIN, {"parameters": {"x": 1}})
        assert status == 400 and "none are taken here" in body["error"]
        grpc_admin.close()
    assert "unloaded tiny by request" in (tmp_path / "serve.log").read_text()


def test_a_broken_version_fails_its_load_with_the_reason(repo: Path, tmp_path: Path, tokens) -> None:
    models = tmp_path / "models"
    shutil.copytree(repo, models)
    with servers.running(
        models, tmp_path / "serve.log", *tokens, "--workers", "1", "--version", "1"
    ) as server:
        assert post(server, "/v2/repository/models/tiny/unload", ADMIN) == (200, {})
        (models / "tiny" / "1" / "decoder.onnx").write_bytes(b"tampered")
        status, body = post(server, "/v2/repository/models/tiny/load", ADMIN)
        assert status == 400 and "tiny/1" in body["error"] and "decoder.onnx" in body["error"]


def test_without_an_admin_token_the_extension_is_off(repo: Path, tmp_path: Path) -> None:
    with servers.running(repo, tmp_path / "serve.log", "--workers", "1") as server:
        status, body = post(server, "/v2/repository/index", None)
        assert status == 403 and "--admin-token-file" in body["error"]
        with pytest.raises(InferenceServerException) as off:
            grpcclient.InferenceServerClient(server.target).unload_model("tiny")
        assert off.value.status() == "StatusCode.PERMISSION_DENIED"
        assert encode_code(server, "") == "OK"  # nothing was unloaded


def test_every_worker_follows_an_unload(repo: Path, tmp_path: Path, tokens) -> None:
    models = tmp_path / "models"
    shutil.copytree(repo, models)
    with servers.running(models, tmp_path / "serve.log", *tokens, "--workers", "2") as server:

        def every_worker_answers(code: str) -> bool:  # 8 fresh connections reach both workers
            return {encode_code(server, CLIENT) for _ in range(8)} == {code}

        assert post(server, "/v2/repository/models/tiny/unload", ADMIN) == (200, {})
        servers.until(lambda: every_worker_answers("StatusCode.NOT_FOUND"), what="every worker unloaded")
        assert post(server, "/v2/repository/models/tiny/load", ADMIN) == (200, {})
        servers.until(lambda: every_worker_answers("OK"), what="every worker loaded again")


def test_the_admin_token_must_differ_from_the_clients(repo: Path, tmp_path: Path) -> None:
    (tmp_path / "same").write_text("one-token\n")
    same = str(tmp_path / "same")
    result = vae("serve", "--repo", str(repo), "--token-file", same, "--admin-token-file", same)
    assert_one_line_error(result, 1, "--admin-token-file", "a token of their own")
