"""What a call to the service can fail with, beyond the core's errors (vaeserve.errors).

Raised by the data plane and the front ends alike; ``service.policy`` gives each its status on
every protocol. Nothing here knows a protocol.
"""

from vaeserve.errors import VaeError


class OverloadedError(VaeError):
    """The queue is full, or the work ahead would pass the call's deadline: back off and retry."""


class UnauthenticatedError(VaeError):
    """The call lacks the token its operation needs (service.policy's access table)."""


class AdminDisabledError(VaeError):
    """The model repository extension is off: the server has no admin token."""


class SharedMemoryDisabledError(VaeError):
    """The server runs without --shared-memory."""


class RegionNotFoundError(VaeError):
    """No registered region, or no shared-memory object, of that name."""


class RegionExistsError(VaeError):
    """A region of that name is already registered."""


class ClientGoneError(VaeError):
    """The client closed its connection before the answer."""


class BodyTimeoutError(VaeError):
    """A request body did not arrive in its time (REST's 408)."""


class AbandonedError(VaeError):
    """The call's deadline passed, or its caller left, while its work ran: the work stopped."""


class ForeignOriginError(VaeError):
    """A REST request a browser sent for another site: a Host name this server does not answer
    to (DNS rebinding), or an Origin that is not the server's own (a cross-site form or fetch)."""
