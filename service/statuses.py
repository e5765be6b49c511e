"""Our errors as each protocol's status, and the one wrapper every gRPC handler runs in.

Each front end (vae.v1 and OIP over gRPC, OIP over HTTP) translates the same errors:
a gRPC status code, or an HTTP code with a ``{"error": ...}`` body.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from vaeserve.errors import ModelNotFoundError, RepositoryError, RequestError, TensorError, VaeError
from vaeserve.service.batching import OverloadedError, deadline
from vaeserve.service.live import AdminDisabledError
from vaeserve.service.shared_memory import (
    RegionExistsError,
    RegionNotFoundError,
    SharedMemoryDisabledError,
)
from vaeserve.service.wire import checked

log = logging.getLogger("vaeserve.service")

GRPC_STATUS: dict[type[VaeError], grpc.StatusCode] = {
    TensorError: grpc.StatusCode.INVALID_ARGUMENT,
    RequestError: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    OverloadedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    RegionNotFoundError: grpc.StatusCode.NOT_FOUND,
    RegionExistsError: grpc.StatusCode.ALREADY_EXISTS,
    SharedMemoryDisabledError: grpc.StatusCode.FAILED_PRECONDITION,
    RepositoryError: grpc.StatusCode.FAILED_PRECONDITION,  # a version that failed to load
    AdminDisabledError: grpc.StatusCode.PERMISSION_DENIED,
}
HTTP_STATUS: dict[type[VaeError], int] = {
    TensorError: 400,
    RequestError: 400,
    ModelNotFoundError: 404,
    OverloadedError: 429,
    RepositoryError: 400,
    AdminDisabledError: 403,
}
KNOWN = tuple(GRPC_STATUS)


def rpc(method: str, protocol: str, rows: Callable[[Any], int]) -> Callable:
    """Time the call, count it by protocol and status code, and turn our errors into statuses.
    ``rows`` tells how many rows a response carries (the rows-processed metric)."""

    def wrap(handler: Callable[..., Awaitable]) -> Callable[..., Awaitable]:
        @functools.wraps(handler)
        async def call(self, request, context: grpc.aio.ServicerContext):
            started = time.perf_counter()
            remaining = context.time_remaining()
            deadline.set(time.monotonic() + remaining if remaining is not None else None)
            code, message, response = grpc.StatusCode.OK, "", None
            try:
                response = await handler(self, checked(request), context)
            except KNOWN as exc:
                code, message = GRPC_STATUS[type(exc)], str(exc)
            except Exception:
                log.exception("%s failed", method)
                code, message = grpc.StatusCode.INTERNAL, f"{method}: internal error (see the server log)"
            finally:
                counted = rows(response) if response is not None else 0
                self.metrics.call(method, code.name, time.perf_counter() - started, counted, protocol)
            if code is not grpc.StatusCode.OK:
                await context.abort(code, message)
            return response

        return call

    return wrap
