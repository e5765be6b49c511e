"""TLS for both ports, from the same files: gRPC's server credentials and the HTTP port's
SSL context (mutual TLS with --tls-client-ca)."""

from __future__ import annotations

import ssl

import grpc

from vaeserve.errors import ConfigError
from vaeserve.service.settings import ServeSettings


def http_ssl_context(settings: ServeSettings) -> ssl.SSLContext | None:
    """The HTTP port's TLS (and mTLS) from the same files as gRPC's."""
    if settings.tls_cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
        if settings.tls_client_ca:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(settings.tls_client_ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS files for the HTTP port: {exc}") from None
    return context


def server_credentials(settings: ServeSettings) -> grpc.ServerCredentials | None:
    if settings.tls_cert is None:
        return None
    try:
        key, cert = settings.tls_key.read_bytes(), settings.tls_cert.read_bytes()
        client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    except OSError as exc:
        raise ConfigError(f"cannot read TLS file {exc.filename} ({exc.strerror})") from None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
