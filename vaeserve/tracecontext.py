"""The caller's W3C trace context, sent with every call the project's clients make (the Python
client, `vae embed --server`, `vae client`, `vae bench`), so that the server's spans join the
caller's trace (service.tracing).

Where it comes from: the current OpenTelemetry span, when the caller's process uses OpenTelemetry
and is inside a span; otherwise ``TRACEPARENT`` (and ``TRACESTATE``) from the environment, as CI
systems and otel-cli set them for the commands they run. Neither: nothing is sent, and nothing
is imported.
"""

from __future__ import annotations

import os
import sys


def trace_metadata() -> tuple[tuple[str, str], ...]:
    """``(("traceparent", ...), ...)`` for a gRPC call's metadata or an HTTP call's headers."""
    if "opentelemetry.trace" in sys.modules:  # the caller uses OpenTelemetry: its current span
        from opentelemetry import propagate, trace

        if trace.get_current_span().get_span_context().is_valid:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            return tuple(carrier.items())
    parent = os.environ.get("TRACEPARENT", "").strip()
    if not parent:
        return ()
    state = os.environ.get("TRACESTATE", "").strip()
    return (("traceparent", parent), ("tracestate", state)) if state else (("traceparent", parent),)
