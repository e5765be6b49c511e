"""The client's connection to a server: the gRPC target, TLS and the retry policy.

UNAVAILABLE is retried with exponential backoff by gRPC's own retry policy (the channel's
service config); several addresses are balanced round robin.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import grpc

from vaeserve.errors import VaeError

RETRY_POLICY = {
    # Several addresses (or a DNS name with several records): one connection to each, calls
    # taken in turn; a replica that fails is skipped while it reconnects, and a call that got
    # UNAVAILABLE is retried, on another replica.
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{"service": "vae.v1.VaeService"}, {"service": "grpc.health.v1.Health"}],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.1s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}


# What gRPC says when the address answers HTTP/1.1 (the REST port, a web server) instead of gRPC.
NOT_GRPC = ("Failed parsing HTTP/2", "http1.x server", "HTTP/1.")


class ServiceError(VaeError):
    """A call failed; ``code`` is the gRPC status code."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        said = details
        if code == grpc.StatusCode.UNAVAILABLE and any(sign in (details or "") for sign in NOT_GRPC):
            said = (
                "this address answers plain HTTP, not gRPC: likely the server's REST port "
                "(--http-port, 8000); gRPC calls go to its --port (50051)"
            )
        super().__init__(f"{code.name}: {said}")
        self.code = code
        self.details = details


def _read(path: str | Path | bytes | None) -> bytes | None:
    if path is None or isinstance(path, bytes):
        return path
    return Path(path).read_bytes()


def channel_target(target: str) -> str:
    """gRPC's target for ``target``: ``HOST:PORT``, a gRPC target (``ipv4:IP:PORT,IP:PORT``,
    ``dns:///NAME:PORT``), or several IP addresses separated by commas (given the ``ipv4:`` or
    ``ipv6:`` scheme gRPC needs for a list)."""
    if "," not in target or target.split(":", 1)[0] in SCHEMES:
        return target
    addresses = target.split(",")
    try:
        families = {ipaddress.ip_address(_host(address)).version for address in addresses}
    except ValueError:
        raise VaeError(
            f"target {target!r}: a list of addresses must be IP:PORT,IP:PORT (or a gRPC target "
            "such as ipv4:IP:PORT,IP:PORT); for host names, give one DNS name with several "
            "records as dns:///NAME:PORT"
        ) from None
    if len(families) != 1:
        raise VaeError(f"target {target!r}: IPv4 and IPv6 addresses cannot be mixed in one list")
    return ("ipv4:" if families == {4} else "ipv6:") + target


SCHEMES = ("ipv4", "ipv6", "dns", "unix", "unix-abstract", "vsock", "xds")


def _host(address: str) -> str:
    host, _, _port = address.strip().rpartition(":")
    return host.strip("[]")


def open_channel(
    target: str,
    tls: bool = False,
    root_certificates: str | Path | bytes | None = None,
    client_certificate: str | Path | bytes | None = None,
    client_key: str | Path | bytes | None = None,
    max_message_mb: int = 64,
) -> grpc.Channel:
    """A channel to ``target`` (see ``channel_target``) with the retry policy, plaintext or TLS
    (mutual with a client certificate)."""
    limit = max_message_mb * 1024 * 1024
    options = [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.enable_retries", 1),
        # A connection of its own (channels with equal options share one otherwise), so
        # that several clients spread over a server's --workers.
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.service_config", json.dumps(RETRY_POLICY)),
    ]
    if tls or root_certificates or client_certificate:
        credentials = grpc.ssl_channel_credentials(
            _read(root_certificates), _read(client_key), _read(client_certificate)
        )
        return grpc.secure_channel(channel_target(target), credentials, options)
    return grpc.insecure_channel(channel_target(target), options)
