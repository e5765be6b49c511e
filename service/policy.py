"""The service's two policies, for every front end: what each error answers, who may call what.

**Errors.** Each of our errors has one gRPC status, found through its class hierarchy (a new
subclass answers as its parent does); its HTTP code follows from that status by Google's
standard mapping (google/rpc/code.proto), so vae.v1, OIP over gRPC and OIP over HTTP cannot
disagree. docs/protocol.md tabulates every documented mistake; tests/test_policy.py sends each
over all three protocols.

**Access.** Every operation (a gRPC method's or an HTTP route's name: Encode, ModelInfer,
RepositoryIndex, ...) needs the clients' bearer token, except health, which orchestrators probe
without credentials, and the model repository extension, which takes the operators' admin token
instead.
"""

from __future__ import annotations

import enum
import hmac

import grpc

from vaeserve.errors import (
    ModelNotFoundError,
    RepositoryError,
    RequestError,
    TensorError,
    UnsupportedError,
    VaeError,
)
from vaeserve.service.errors import (
    AbandonedError,
    AdminDisabledError,
    BodyTimeoutError,
    ClientGoneError,
    ForeignOriginError,
    OverloadedError,
    RegionExistsError,
    RegionNotFoundError,
    SharedMemoryDisabledError,
    UnauthenticatedError,
)

Code = grpc.StatusCode

# An error's gRPC status; looked up along the exception's class hierarchy. A VaeError not listed
# is a refusal we explain (its message goes back), never an internal error.
STATUS: dict[type[Exception], Code] = {
    VaeError: Code.FAILED_PRECONDITION,
    TensorError: Code.INVALID_ARGUMENT,
    RequestError: Code.INVALID_ARGUMENT,
    ModelNotFoundError: Code.NOT_FOUND,
    UnsupportedError: Code.UNIMPLEMENTED,  # HTTP 501
    RegionNotFoundError: Code.NOT_FOUND,
    RegionExistsError: Code.ALREADY_EXISTS,
    SharedMemoryDisabledError: Code.FAILED_PRECONDITION,
    RepositoryError: Code.FAILED_PRECONDITION,  # a version that fails to load
    OverloadedError: Code.RESOURCE_EXHAUSTED,
    UnauthenticatedError: Code.UNAUTHENTICATED,
    AdminDisabledError: Code.PERMISSION_DENIED,
    ClientGoneError: Code.CANCELLED,
    BodyTimeoutError: Code.DEADLINE_EXCEEDED,
    AbandonedError: Code.DEADLINE_EXCEEDED,
    ForeignOriginError: Code.PERMISSION_DENIED,
}

# google.rpc.Code → HTTP, as Google's APIs map them (499 is nginx's "client closed request").
HTTP: dict[Code, int] = {
    Code.OK: 200,
    Code.CANCELLED: 499,
    Code.UNKNOWN: 500,
    Code.INVALID_ARGUMENT: 400,
    Code.DEADLINE_EXCEEDED: 504,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.PERMISSION_DENIED: 403,
    Code.UNAUTHENTICATED: 401,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.FAILED_PRECONDITION: 400,
    Code.ABORTED: 409,
    Code.OUT_OF_RANGE: 400,
    Code.UNIMPLEMENTED: 501,
    Code.INTERNAL: 500,
    Code.UNAVAILABLE: 503,
    Code.DATA_LOSS: 500,
}


def grpc_status(exc: Exception) -> Code:
    """The status of an error: its class's, or its nearest listed ancestor's; INTERNAL else."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return Code.INTERNAL


# HTTP's own word where it has one that gRPC lacks: a body that did not arrive in time (REST only).
HTTP_OVERRIDES: dict[type[Exception], int] = {BodyTimeoutError: 408}


def http_status(exc: Exception) -> int:
    for kind in type(exc).__mro__:
        if kind in HTTP_OVERRIDES:
            return HTTP_OVERRIDES[kind]
    return HTTP[grpc_status(exc)]


def internal_error(operation: str) -> str:
    """What a caller is told of a bug (the server logs its traceback)."""
    return f"{operation}: internal error (see the server log)"


class Credential(enum.Enum):
    NONE = "none"
    CLIENT = "bearer token"
    ADMIN = "admin token"


# Operations that need other than the clients' bearer token; every other needs it.
ACCESS: dict[str, Credential] = {
    "Health": Credential.NONE,  # grpc.health.v1, whatever its method
    "ServerLive": Credential.NONE,
    "ServerReady": Credential.NONE,
    "ModelReady": Credential.NONE,
    "OpenAPI": Credential.NONE,
    "Console": Credential.NONE,  # the page and its files: it asks for the token the API wants
    "ConsoleAsset": Credential.NONE,
    "RepositoryIndex": Credential.ADMIN,
    "RepositoryModelLoad": Credential.ADMIN,
    "RepositoryModelUnload": Credential.ADMIN,
}
HEALTH_SERVICE = "grpc.health.v1.Health"


def credential(operation: str) -> Credential:
    return ACCESS.get(operation, Credential.CLIENT)


def grpc_operation(method: str) -> str:
    """``/package.Service/Method`` → the operation it performs."""
    service, _, name = method.lstrip("/").partition("/")
    return "Health" if service == HEALTH_SERVICE else name


class Tokens:
    """The bearer tokens this server expects ("Bearer <token>"); None: not asked for."""

    def __init__(self, client: str | None, admin: str | None) -> None:
        self.wanted = {
            Credential.CLIENT: f"Bearer {client}".encode() if client else None,
            Credential.ADMIN: f"Bearer {admin}".encode() if admin else None,
        }

    @property
    def any(self) -> bool:
        return any(self.wanted.values())

    def check(self, operation: str, supplied: str, where: str) -> None:
        """UnauthenticatedError unless ``supplied`` (the authorization value) is what
        ``operation`` needs; ``where`` says how the protocol carries it (metadata or a header)."""
        needed = credential(operation)
        if needed is Credential.NONE:
            return
        wanted = self.wanted[needed]
        if wanted is None and needed is Credential.CLIENT:
            return
        # Without an admin token the extension is off: its handlers say so (PERMISSION_DENIED).
        # A header may carry bytes that are not UTF-8 (kept as surrogates): they match no token.
        if wanted is None or hmac.compare_digest(supplied.encode("utf-8", "surrogateescape"), wanted):
            return
        raise UnauthenticatedError(f"missing or invalid {needed.value} ({where})")
