"""Traces (service/tracing.py): a real `vae serve` over the tiny model exporting OpenTelemetry
spans, through the SDK's own exporters, to OTLP receivers in this process that decode what
arrives (OTLP/HTTP protobuf, and OTLP/gRPC), under the trace context the caller sent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import numpy as np
import pytest
import servers
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from vaeserve.client import VaeClient
from vaeserve.datasets import model_inputs

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER = "00f067aa0ba902b7"  # the caller's span: the server's span is its child
TRACEPARENT = f"00-{TRACE}-{CALLER}-01"


class Spans:
    """What the receivers decoded: one dict per span, with its resource's service name."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.lock = threading.Lock()

    def add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    attributes = {a.key: _value(a.value) for a in span.attributes}
                    with self.lock:
                        self.spans.append(
                            {
                                "name": span.name,
                                "trace": span.trace_id.hex(),
                                "id": span.span_id.hex(),
                                "parent": span.parent_span_id.hex(),
                                "attributes": attributes,
                                "service": resource.get("service.name"),
                                "error": span.status.code == span.status.STATUS_CODE_ERROR,
                                "start": span.start_time_unix_nano,
                                "end": span.end_time_unix_nano,
                            }
                        )

    def of(self, trace: str) -> list[dict]:
        with self.lock:
            return [s for s in self.spans if s["trace"] == trace]


def _value(value):
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@pytest.fixture
def http_receiver():
    spans = Spans()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            assert self.path == "/v1/traces" and self.headers["Content-Type"] == "application/x-protobuf"
            spans.add(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
            answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield spans, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture
def grpc_receiver():
    spans = Spans()

    class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):  # noqa: N802 - the service's name
            spans.add(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield spans, f"http://127.0.0.1:{port}"
    server.stop(0)


def exporting(protocol: str, endpoint: str) -> dict[str, str]:
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_SERVICE_NAME": "vaeserve-under-test",
        "OTEL_BSP_SCHEDULE_DELAY": "50",  # export within 50 ms, not the SDK's 5 s
    }


def children(spans: list[dict], parent: dict) -> dict[str, dict]:
    return {s["name"]: s for s in spans if s["parent"] == parent["id"]}


def test_a_rest_call_is_traced_under_its_traceparent(
    repo: Path, http_receiver, tmp_path: Path, mnist
) -> None:
    """OTLP/HTTP: the REST call's server span is the caller's span's child, with the use below
    it (model, version, rows) and the onnxruntime run below that, all in the caller's trace; a
    refused call's span says so; a call without a traceparent starts a trace of its own."""
    spans, endpoint = http_receiver
    rows = model_inputs(mnist.test_images[:3], "threshold")
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [3, 784], "data": rows.ravel().tolist()}]}
    with servers.running(repo, tmp_path / "serve.log", env=exporting("http/protobuf", endpoint)) as server:

        def post(payload: dict, headers: dict[str, str]) -> int:
            request = urllib.request.Request(
                f"http://{server.http}/v2/models/tiny-encoder/infer",
                json.dumps(payload).encode(),
                {"Content-Type": "application/json", **headers},
            )
            try:
                with urllib.request.urlopen(request, timeout=30) as answer:
                    return answer.status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert post(body, {"traceparent": TRACEPARENT}) == 200
        wrong = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 5], "data": [0] * 5}]}
        assert post(wrong, {"traceparent": f"00-{'ab' * 16}-{CALLER}-01"}) == 400
        assert post(body, {}) == 200
        servers.until(lambda: len(spans.of(TRACE)) >= 3 and spans.of("ab" * 16), what="the spans")
        log = server.output()
    assert "traces: service 'vaeserve-under-test', OTLP http/protobuf to " + endpoint in log
    traced = spans.of(TRACE)
    [call] = [s for s in traced if s["parent"] == CALLER]
    assert call["name"] == "oip-http ModelInfer" and call["service"] == "vaeserve-under-test"
    assert call["attributes"]["vaeserve.status"] == "200" and call["attributes"]["vaeserve.rows"] == 3
    use = children(traced, call)["encode"]
    assert use["attributes"] == {"vaeserve.model": "tiny", "vaeserve.version": 1, "vaeserve.rows": 3}
    run = children(traced, use)["run"]
    assert run["attributes"]["vaeserve.batch_rows"] == 3
    assert call["start"] <= use["start"] <= run["start"] <= run["end"] <= use["end"] <= call["end"]
    [refused] = [s for s in spans.of("ab" * 16) if s["parent"] == CALLER]
    assert refused["error"] and refused["attributes"]["vaeserve.status"] == "400"
    roots = [s for s in spans.spans if s["name"] == "oip-http ModelInfer" and not s["parent"]]
    assert len(roots) == 1 and roots[0]["trace"] not in (TRACE, "ab" * 16)


def test_grpc_calls_over_otlp_grpc_join_the_clients_trace(
    repo: Path, grpc_receiver, tmp_path: Path, mnist, monkeypatch
) -> None:
    """OTLP/gRPC: the Python client and `vae embed --server` send the caller's trace context
    (here TRACEPARENT, as a CI system sets it); the server's vae.v1 spans join it, one per call."""
    spans, endpoint = grpc_receiver
    rows = model_inputs(mnist.test_images[:40], "threshold")
    np.save(tmp_path / "rows.npy", rows)
    with servers.running(repo, tmp_path / "serve.log", env=exporting("grpc", endpoint)) as server:
        monkeypatch.setenv("TRACEPARENT", TRACEPARENT)
        with VaeClient(server.target, timeout=30) as client:
            client.encode(rows[:5])
            client.sample_prior(2, seed=1)
        other = f"00-{'cd' * 16}-{CALLER}-01"
        embed = subprocess.run(
            [sys.executable, "-m", "vaeserve.cli", "embed", "--model", str(repo / "tiny"), "--input",
             str(tmp_path / "rows.npy"), "--output", str(tmp_path / "out.npy"), "--server", server.target,
             "--chunk-rows", "16", "--no-progress"],
            capture_output=True, text=True, timeout=120, env={**os.environ, "TRACEPARENT": other},
        )  # fmt: skip
        assert embed.returncode == 0, embed.stderr

        def embedded() -> list[dict]:
            return [s for s in spans.of("cd" * 16) if s["parent"] == CALLER and s["name"] == "v1 Encode"]

        def rows(calls: list[dict]) -> int:
            return sum(s["attributes"]["vaeserve.rows"] for s in calls)

        servers.until(lambda: len(spans.of(TRACE)) >= 6 and rows(embedded()) == 40, what="the spans")
    calls = {s["name"]: s for s in spans.of(TRACE) if s["parent"] == CALLER}
    assert {"v1 Encode", "v1 SamplePrior"} <= set(calls)
    sampled = children(spans.of(TRACE), calls["v1 SamplePrior"])["sample_prior"]
    assert sampled["attributes"]["vaeserve.rows"] == 2  # SamplePrior's count
    # vae embed's 40 rows, in its chunks' calls (pieces of 16-row chunks), each with its use below.
    servers.until(
        lambda: all("encode" in children(spans.of("cd" * 16), call) for call in embedded()), what="uses"
    )


def test_an_exporter_it_does_not_have_is_refused_in_one_line(repo: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "vaeserve.cli", "serve", "--repo", str(repo), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "OTEL_TRACES_EXPORTER": "zipkin"},
    )
    assert done.returncode != 0
    assert "OTEL_TRACES_EXPORTER=zipkin: zipkin is not an exporter vae serve has" in done.stderr
    assert "Traceback" not in done.stderr
