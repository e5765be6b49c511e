"""The REST API fuzzed from its own OpenAPI document (schemathesis, on hypothesis): every
operation, with bodies, path parameters and headers that fit the document and ones that do not,
with the client token, a wrong one and none. Every answer is a status the document lists for
that operation, with the body and content type it promises, never a 5xx but a documented 503 (not ready);
bad data is refused. The server runs with both tokens so the repository extension is reached."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is installed by make setup")
from schemathesis import checks  # noqa: E402

from vaeserve.service.oip.openapi import document  # noqa: E402

EXAMPLES = int(os.environ.get("VAESERVE_FUZZ_EXAMPLES", "150"))
CLIENT, ADMIN = "fuzz-client-token", "fuzz-admin-token"
# The names this server serves, so generated calls reach the models and not only 404s; the
# repository's own name is left out, so a fuzzed unload cannot take the models away mid-run.
SERVED = ["tiny-encoder", "tiny-decoder", "tiny-reconstruct", "tiny-sample-prior"]
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
]


@pytest.fixture(scope="module")
def rest(serve):
    return serve("--workers", "1", token=CLIENT, admin_token=ADMIN)


# The document the server serves at /v2/openapi.json (test_oip checks they are the same).
schema = schemathesis.openapi.from_dict(document())


@schema.parametrize()
@schema.given(
    model=st.none() | st.sampled_from(SERVED),
    version=st.none() | st.sampled_from(["1", "latest"]),
    # Mostly the token the operation wants, so most calls get past authentication.
    token=st.sampled_from(["right", "right", "right", "other", "wrong", None]),
)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_answers_what_the_document_promises(case, rest, model, version, token) -> None:
    for name, value in (("model", model), ("version", version)):
        if value is not None and name in (case.path_parameters or {}):
            case.path_parameters[name] = value
    admin = case.path.startswith("/v2/repository")
    chosen = {"right": ADMIN if admin else CLIENT, "other": CLIENT if admin else ADMIN}.get(token, token)
    headers = dict(case.headers or {})
    headers.pop("Authorization", None)
    if chosen is not None:
        headers["Authorization"] = f"Bearer {chosen}"
    case.headers = headers
    response = case.call(base_url=f"http://{rest.http}", timeout=30)
    case.validate_response(response, checks=CHECKS)


def status_of(rest, method: str, path: str, token: str, body: dict | None = None) -> int:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    request = urllib.request.Request(f"http://{rest.http}{path}", data, headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def test_the_server_lived_through_it(rest) -> None:
    """Whatever ran on this server before (the fuzzing above, in any order, or none): it is
    healthy, serves its model, refuses bad data, and logged no traceback."""
    from vaeserve.client import VaeClient

    with VaeClient(rest.target, token=CLIENT) as client:
        assert client.health() == "SERVING"
    assert status_of(rest, "GET", "/v2/models/tiny-encoder/versions/1", CLIENT) == 200
    assert status_of(rest, "POST", "/v2/repository/index", ADMIN, {}) == 200
    bad = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [0, 0, 0]}]}
    assert status_of(rest, "POST", "/v2/models/tiny-encoder/infer", CLIENT, bad) == 400
    assert "Traceback" not in rest.output() and "internal error" not in rest.output()
