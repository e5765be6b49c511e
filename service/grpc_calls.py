"""The one wrapper every gRPC handler runs in, vae.v1's and OIP's, unary and streaming.

It sets the call's deadline for the data plane's admission, times and counts the call by
protocol and status, traces it (service.tracing: a span under the caller's traceparent, when
traces are on), and answers our errors with the status ``service.policy`` gives them; any other
exception is a bug: logged with its traceback, answered INTERNAL.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from vaeserve.service import policy, tracing
from vaeserve.service.batching import deadline
from vaeserve.service.residency import NotResidentError
from vaeserve.service.wire import checked

log = logging.getLogger("vaeserve.service")
OK = grpc.StatusCode.OK


def _set_deadline(context: grpc.aio.ServicerContext) -> None:
    remaining = context.time_remaining()
    deadline.set(time.monotonic() + remaining if remaining is not None else None)


async def _answer(method: str, handler: Callable[..., Awaitable], servicer, request, *rest) -> tuple:
    """(response, OK, "") or (None, the error's status, its message). The request is checked
    here: one that did not decode (service.wire) is the client's error like any other."""
    try:
        try:
            return await handler(servicer, checked(request), *rest), OK, ""
        except NotResidentError as missing:  # bounded residency: loaded for this call, which then runs
            await missing.loaded()
            return await handler(servicer, checked(request), *rest), OK, ""
    except Exception as exc:
        code = policy.grpc_status(exc)
        if code is grpc.StatusCode.INTERNAL:
            log.exception("%s failed", method)
            return None, code, policy.internal_error(method)
        return None, code, str(exc)


def rpc(method: str, protocol: str, rows: Callable[[Any], int]) -> Callable:
    """A unary handler, wrapped. ``rows`` tells how many rows a response carries (the
    rows-processed metric)."""

    def wrap(handler: Callable[..., Awaitable]) -> Callable[..., Awaitable]:
        @functools.wraps(handler)
        async def call(self, request, context: grpc.aio.ServicerContext):
            started = self.metrics.started()
            _set_deadline(context)
            with tracing.call(method, protocol, context.invocation_metadata) as span:
                response, code, message = await _answer(method, handler, self, request, context)
                counted = rows(response) if response is not None else 0
                tracing.ended(span, code.name, code is OK, counted)
            self.metrics.call(method, code.name, started, counted, protocol)
            if code is not OK:
                await context.abort(code, message)
            return response

        return call

    return wrap


def stream_rpc(method: str, protocol: str, rows: Callable[[Any], int]) -> Callable:
    """A stream-stream handler whose ``handler(self, request)`` answers one request: each
    request is answered and counted as a unary call is; an error ends the stream with its status."""

    def wrap(handler: Callable[..., Awaitable]) -> Callable[..., AsyncIterator]:
        @functools.wraps(handler)
        async def call(self, requests: AsyncIterator, context: grpc.aio.ServicerContext):
            _set_deadline(context)
            async for request in requests:
                started = self.metrics.started()
                with tracing.call(method, protocol, context.invocation_metadata) as span:
                    response, code, message = await _answer(method, handler, self, request)
                    counted = rows(response) if response is not None else 0
                    tracing.ended(span, code.name, code is OK, counted)
                self.metrics.call(method, code.name, started, counted, protocol)
                if code is not OK:
                    await context.abort(code, message)
                yield response

        return call

    return wrap
