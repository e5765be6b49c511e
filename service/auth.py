"""Bearer tokens on gRPC: a call without the token its operation needs is refused before any
model code runs. Which operations need which token is ``service.policy``'s table, shared with
the HTTP front end.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc

from vaeserve.service import policy
from vaeserve.service.errors import UnauthenticatedError

WHERE = "metadata 'authorization: Bearer <token>'"


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: policy.Tokens, on_reject: Callable[[str], None] | None = None) -> None:
        self.tokens = tokens
        self.on_reject = on_reject or (lambda method: None)

    async def intercept_service(
        self, continuation: Callable[..., Awaitable], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        metadata = dict(details.invocation_metadata or ())
        try:
            self.tokens.check(
                policy.grpc_operation(details.method), str(metadata.get("authorization", "")), WHERE
            )
        except UnauthenticatedError as exc:
            self.on_reject(details.method)
            return _denied(handler, policy.grpc_status(exc), str(exc))
        return handler


def _denied(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler that refuses on the call's headers: a streaming-request handler is invoked at
    once, without waiting for a message, so a caller that sends headers and never a message holds
    nothing (a unary handler would wait for the message, holding a slot of --max-concurrent-rpcs,
    before it could refuse)."""

    async def abort(requests, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    async def abort_stream(requests, context: grpc.aio.ServicerContext):
        await context.abort(code, message)
        yield  # pragma: no cover - abort raises

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary or handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(abort, **kwargs)
    return grpc.stream_stream_rpc_method_handler(abort_stream, **kwargs)
