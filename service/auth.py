"""Bearer-token authentication: a call without the token is refused before any model code runs.

Health checks stay open (orchestrators probe them without credentials): grpc.health.v1 and the
Open Inference Protocol's ServerLive, ServerReady and ModelReady. The model repository extension
(RepositoryIndex, RepositoryModelLoad, RepositoryModelUnload) takes the operators' admin token
instead of the clients'.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

import grpc

ADMIN_PREFIXES = ("/inference.GRPCInferenceService/Repository",)
OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
    "/inference.GRPCInferenceService/ModelReady",
)


def expected(token: str | None) -> bytes | None:
    return f"Bearer {token}".encode() if token else None


def authorized(supplied: str, wanted: bytes | None) -> bool:
    """``wanted`` None: nothing is asked for."""
    return wanted is None or hmac.compare_digest(supplied.encode(), wanted)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """The clients' token on every call but health; the operators' token alone on the model
    repository extension (which, without an admin token, its handlers refuse)."""

    def __init__(
        self,
        token: str | None,
        admin_token: str | None = None,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        self.expected, self.admin = expected(token), expected(admin_token)
        self.on_reject = on_reject or (lambda method: None)

    async def intercept_service(
        self, continuation: Callable[..., Awaitable], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        admin = details.method.startswith(ADMIN_PREFIXES)
        metadata = dict(details.invocation_metadata or ())
        if authorized(str(metadata.get("authorization", "")), self.admin if admin else self.expected):
            return handler
        self.on_reject(details.method)
        whose = "admin token" if admin else "bearer token"
        return _denied(handler, f"missing or invalid {whose} (metadata 'authorization: Bearer <token>')")


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
