"""Prometheus metrics of the service, on their own registry (several servers can share a process)."""

from __future__ import annotations

import functools
import os
import time
from contextvars import ContextVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, start_http_server

from vaeserve.errors import ConfigError

LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
# The gRPC services whose calls are counted, by the protocol label they carry.
GRPC_PROTOCOLS = {"vae.v1.VaeService": "v1", "inference.GRPCInferenceService": "oip-grpc"}
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# The repository model a call is about: set by the data plane where a request's model resolves,
# read when the call is counted ("" for a call that named no loaded model).
CALL_MODEL: ContextVar[str] = ContextVar("call_model", default="")
# Set by the --workers supervisor: every worker's counters are files in this folder.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Answers that are not errors, by protocol: gRPC's OK, HTTP's 2xx.
SUCCESS = frozenset({"OK", "200"})


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "vaeserve_requests",
            "Calls by protocol (v1, oip-grpc, oip-http), method, status code (gRPC's, or HTTP's) and "
            "model (the repository's name; empty when the call named no loaded model)",
            ["protocol", "method", "code", "model"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "vaeserve_request_seconds",
            "Call latency in the server, by protocol, method and model",
            ["protocol", "method", "model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rows = Counter(
            "vaeserve_rows",
            "Rows processed, by protocol and method",
            ["protocol", "method"],
            registry=self.registry,
        )
        self.batch_rows = Histogram(
            "vaeserve_batch_rows",
            "Rows per onnxruntime run, by graph",
            ["graph"],
            buckets=ROW_BUCKETS,
            registry=self.registry,
        )
        self.queue_seconds = Histogram(
            "vaeserve_queue_seconds",
            "Time a call waited for its batch",
            ["graph"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.repository = Counter(
            "vaeserve_repository_events",
            "Model repository changes followed while serving (--poll-s): loaded, refused, retired",
            ["event"],
            registry=self.registry,
        )
        self.models = Gauge(
            "vaeserve_models_loaded",
            "Model versions being served",
            registry=self.registry,
            multiprocess_mode="livemax",  # with --workers: each worker loads every version
        )

        # Autoscaling's signal: calls inside the data plane (queued, admitted or running) by model.
        self.in_flight_calls = Gauge(
            "vaeserve_in_flight_calls",
            "Calls of a model inside the data plane now (waiting for a batch, admitted or running), "
            "summed over --workers: the load to autoscale on",
            ["model"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.shadow_calls = Counter(
            "vaeserve_shadow_calls",
            "Mirrored copies of routed calls run on a traffic split's shadow version (vae traffic), by "
            "model, shadow version, use and outcome: answered, failed, or dropped (too many in flight)",
            ["model", "version", "method", "outcome"],
            registry=self.registry,
        )
        self.shadow_difference = Histogram(
            "vaeserve_shadow_max_abs_difference",
            "Largest absolute difference between a shadow's outputs and the routed version's answer",
            ["model", "version", "method"],
            buckets=(1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0),
            registry=self.registry,
        )
        self.cache_hits = Counter(
            "vaeserve_cache_hits",
            "Calls answered from the response cache (--cache-mb), by model and use",
            ["model", "method"],
            registry=self.registry,
        )
        self.cache_misses = Counter(
            "vaeserve_cache_misses",
            "Cacheable calls (deterministic: no draw, or a seeded one) not found in the response cache",
            ["model", "method"],
            registry=self.registry,
        )
        self.cache_evictions = Counter(
            "vaeserve_cache_evictions",
            "Answers dropped from the response cache, least recently used first, to stay within --cache-mb",
            registry=self.registry,
        )
        self.cache_bytes = Gauge(
            "vaeserve_cache_bytes",
            "Bytes of answers held in the response cache",
            registry=self.registry,
            multiprocess_mode="livesum",  # with --workers: each worker has a cache of its own
        )

    # Labelled children are looked up once and kept: labels() costs more than the update.
    @functools.cache  # noqa: B019 - one Metrics per server, kept for its lifetime
    def _child(self, metric: str, *labels: str):
        return getattr(self, metric).labels(*labels)

    @staticmethod
    def started() -> float:
        """A call begins: its clock starts, and it is about no model until its model resolves."""
        CALL_MODEL.set("")
        return time.perf_counter()

    def call(self, method: str, code: str, started: float, rows: int, protocol: str) -> None:
        """A call ended with ``code``; ``started`` is what ``started()`` gave it."""
        model = CALL_MODEL.get()
        self._child("requests", protocol, method, code, model).inc()
        self._child("latency", protocol, method, model).observe(time.perf_counter() - started)
        if rows:
            self._child("rows", protocol, method).inc(rows)

    def refused(self, full_method: str) -> None:
        """A gRPC call refused before its handler ran (a missing or wrong token)."""
        service, _, method = full_method.lstrip("/").partition("/")
        self._child("requests", GRPC_PROTOCOLS.get(service, service), method, "UNAUTHENTICATED", "").inc()

    def queued(self, graph: str, seconds: float) -> None:
        self._child("queue_seconds", graph).observe(seconds)

    def batch(self, graph: str, rows: int) -> None:
        self._child("batch_rows", graph).observe(rows)

    def cache_event(self, kind: str, model: str, method: str, count: int = 1) -> None:
        """A response-cache hit, miss (by model and use) or evictions."""
        if kind == "evictions":
            self.cache_evictions.inc(count)
        else:
            self._child(f"cache_{kind}", model, method).inc(count)

    def shadow_call(
        self, model: str, version: int, method: str, outcome: str, difference: float | None = None
    ) -> None:
        self._child("shadow_calls", model, str(version), method, outcome).inc()
        if difference is not None:
            self._child("shadow_difference", model, str(version), method).observe(difference)

    def repository_event(self, event: str) -> None:
        self._child("repository", event).inc()

    def serve_http(self, host: str, port: int):
        return serve_http(host, port, self.registry)

    def live(self) -> dict:
        """Calls, errors and latency so far per model and protocol, of the whole service (with
        --workers, every worker's counters): a caller's rates and percentiles are differences
        between two of these."""
        folder = os.environ.get(MULTIPROC_ENV)
        registry = self.registry
        if folder:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=folder)
        return {"time": time.time(), "series": sorted(_series(registry).values(), key=_order)}


def _series(registry: CollectorRegistry) -> dict[tuple[str, str], dict]:
    """{(model, protocol): {model, protocol, calls, errors, latency: {le: count}}} from the
    request counter and the latency histogram, summed over methods and codes."""
    series: dict[tuple[str, str], dict] = {}

    def entry(labels: dict[str, str]) -> dict:
        key = (labels["model"], labels["protocol"])
        empty = {"model": key[0], "protocol": key[1], "calls": 0, "errors": 0, "latency": {}}
        return series.setdefault(key, empty)

    for family in registry.collect():
        for sample in family.samples:
            if sample.name == "vaeserve_requests_total":
                found = entry(sample.labels)
                found["calls"] += sample.value
                found["errors"] += 0 if sample.labels["code"] in SUCCESS else sample.value
            elif sample.name == "vaeserve_request_seconds_bucket":
                buckets = entry(sample.labels)["latency"]
                buckets[sample.labels["le"]] = buckets.get(sample.labels["le"], 0) + sample.value
    return series


def _order(entry: dict) -> tuple[bool, str, str]:
    return (not entry["model"], entry["model"], entry["protocol"])


def serve_http(host: str, port: int, registry: CollectorRegistry):
    """The metrics page's HTTP server, on a thread of its own."""
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(f"--metrics-port {port}: cannot listen on {host} ({exc.strerror})") from None
    return server


def sample_total(page: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples on a metrics page (Prometheus text) whose labels include
    ``labels``; 0 when there are none. What tests and benchmarks read of a server's page."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )
