"""OpenTelemetry traces of the service's calls, when the standard variables ask for them.

``OTEL_TRACES_EXPORTER=otlp`` (or ``console``) turns them on; the OpenTelemetry SDK then reads
the rest as it does everywhere: ``OTEL_EXPORTER_OTLP_ENDPOINT`` (and ``..._TRACES_ENDPOINT``),
``OTEL_EXPORTER_OTLP_PROTOCOL`` (``http/protobuf``, the specification's default, or ``grpc``),
headers, ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER`` and its
argument, ``OTEL_BSP_*``. Unset or ``none``: nothing is imported and every hook below is one
check of a module global.

Every call gets a server span, a child of the caller's W3C ``traceparent`` (gRPC metadata, HTTP
header) when it sent one, named by protocol and method, with its status and rows; the data plane
adds the use (``encode``: model, version, rows, whether the cache answered) and, below it, the
time queued or admitted (``queue``) and each onnxruntime run (``run``: the rows it ran, merged
batch included).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping

from vaeserve.errors import ConfigError

# The tracer while traces are on (configure), else None: the hooks' one check.
TRACER = None
_PROVIDER = None
EXPORTERS = ("otlp", "console", "none")
PROTOCOLS = ("http/protobuf", "grpc")


def configure(environ: Mapping[str, str] = os.environ) -> str:
    """Start exporting if the variables ask; what was set up, in words for the log ('' if off)."""
    global TRACER, _PROVIDER
    chosen = [e.strip() for e in environ.get("OTEL_TRACES_EXPORTER", "none").split(",") if e.strip()]
    unknown = [e for e in chosen if e not in EXPORTERS]
    if unknown:
        raise ConfigError(
            f"OTEL_TRACES_EXPORTER={environ['OTEL_TRACES_EXPORTER']}: {', '.join(unknown)} is not an "
            f"exporter vae serve has; expected {', '.join(EXPORTERS)}"
        )
    chosen = [e for e in chosen if e != "none"]
    if not chosen:
        return ""
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    if "otlp" in chosen and protocol not in PROTOCOLS:
        raise ConfigError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol}: expected {' or '.join(PROTOCOLS)} (http/json is "
            "not implemented by OpenTelemetry's Python exporter)"
        )
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    name = environ.get("OTEL_SERVICE_NAME") or "vaeserve"
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    described = []
    for exporter in chosen:
        if exporter == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
            described.append("console")
            continue
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT", "the exporter's default endpoint"
        )
        described.append(f"OTLP {protocol} to {endpoint}")
    trace.set_tracer_provider(provider)
    _PROVIDER, TRACER = provider, provider.get_tracer("vaeserve.service")
    return f"traces: service {name!r}, {', '.join(described)}"


def shutdown() -> None:
    """Export what is left (the server is stopping)."""
    global TRACER, _PROVIDER
    if _PROVIDER is not None:
        _PROVIDER.shutdown()
    TRACER = _PROVIDER = None


_OFF = contextlib.nullcontext()


def call(method: str, protocol: str, carrier: Mapping[str, str] | Callable[[], Iterable] | None):
    """A call's server span, a child of the caller's traceparent in ``carrier`` (HTTP headers, or
    what gives gRPC's metadata pairs, asked only when on); a context manager giving the span
    (None when traces are off)."""
    if TRACER is None:
        return _OFF
    return _call_span(method, protocol, carrier)


@contextlib.contextmanager
def _call_span(method: str, protocol: str, carrier: Mapping[str, str] | None) -> Iterator:
    from opentelemetry import propagate, trace

    if callable(carrier):
        carrier = dict(carrier() or ())
    parent = propagate.extract(carrier) if carrier else None
    with TRACER.start_as_current_span(
        f"{protocol} {method}",
        context=parent,
        kind=trace.SpanKind.SERVER,
        attributes={
            "rpc.system": "grpc" if protocol != "oip-http" else "http",
            "rpc.method": method,
            "vaeserve.protocol": protocol,
        },
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        yield span


def ended(span, code: str, ok: bool, rows: int) -> None:
    """What the call answered: its status (gRPC's name or HTTP's number) and rows."""
    if span is None:
        return
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("vaeserve.status", code)
    span.set_attribute("vaeserve.rows", rows)
    if not ok:
        span.set_status(Status(StatusCode.ERROR, code))


def use(name: str, version, first):
    """The data plane's span of one use (encode, decode, ...) of ``version``; ``first`` is its
    first argument: the rows (or images), or SamplePrior's count."""
    if TRACER is None:
        return _OFF
    rows = len(first) if hasattr(first, "__len__") else int(first)
    attributes = {"vaeserve.model": version.name, "vaeserve.version": version.version, "vaeserve.rows": rows}
    return TRACER.start_as_current_span(name, attributes=attributes)


def annotate(span, **attributes) -> None:
    if span is not None:
        for key, value in attributes.items():
            span.set_attribute(f"vaeserve.{key}", value)


def now() -> int:
    """A timestamp for ``record`` (ns since the epoch, as spans take them); 0 when off."""
    return time.time_ns() if TRACER is not None else 0


def record(name: str, started_ns: int, ended_ns: int | None = None, **attributes) -> None:
    """A finished child span of the current one, from ``started_ns`` to ``ended_ns`` (now): the
    time a call waited, or a run that served it with other calls' rows."""
    if TRACER is None or not started_ns:
        return
    span = TRACER.start_span(name, start_time=started_ns)
    for key, value in attributes.items():
        span.set_attribute(f"vaeserve.{key}", value)
    span.end(end_time=ended_ns or time.time_ns())
