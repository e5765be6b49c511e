"""Bearer-token authentication: a call without the token is refused before any model code runs.

Health checks stay open (orchestrators probe them without credentials): grpc.health.v1 and the
Open Inference Protocol's ServerLive, ServerReady and ModelReady.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

import grpc

OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
    "/inference.GRPCInferenceService/ModelReady",
)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str, on_reject: Callable[[str], None] | None = None) -> None:
        self.expected = f"Bearer {token}".encode()
        self.on_reject = on_reject or (lambda method: None)

    async def intercept_service(
        self, continuation: Callable[..., Awaitable], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        metadata = dict(details.invocation_metadata or ())
        supplied = str(metadata.get("authorization", "")).encode()
        if hmac.compare_digest(supplied, self.expected):
            return handler
        self.on_reject(details.method)
        return _denied(handler, "missing or invalid bearer token (metadata 'authorization: Bearer <token>')")


def _denied(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    async def abort(request, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def abort_stream(requests, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - abort raises

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(abort, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(abort, **kwargs)
    return grpc.stream_stream_rpc_method_handler(abort_stream, **kwargs)
