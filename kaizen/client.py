"""Connecting to `kaizen serve` as a client: a channel that carries a credential.

Every kaizen RPC needs `authorization: Bearer <API key or user token>`. Over TLS the
credential travels as gRPC call credentials; over plaintext (loopback, tests, a sidecar)
an interceptor adds the same metadata, since gRPC refuses call credentials on an
insecure channel.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import grpc

from kaizen.auth import read_secret

CREDENTIAL_ENV = "KAIZEN_API_KEY"  # what the CLI's clients read when no --key-file is given


class _Bearer(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, credential: str) -> None:
        self.header = ("authorization", f"Bearer {credential}")

    def _details(self, details):
        metadata = [*(details.metadata or ()), self.header]
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


def connect(
    target: str,
    credential: str | None = None,
    *,
    root_ca: bytes | None = None,
    client_cert: bytes | None = None,
    client_key: bytes | None = None,
) -> grpc.Channel:
    """A channel to `target`: TLS when `root_ca` is given (with a client certificate for
    mutual TLS), plaintext otherwise; every call carries `credential` when given."""
    if root_ca is None:
        channel = grpc.insecure_channel(target)
        return grpc.intercept_channel(channel, _Bearer(credential)) if credential else channel
    tls = grpc.ssl_channel_credentials(root_ca, client_key, client_cert)
    if credential:
        tls = grpc.composite_channel_credentials(
            tls, grpc.access_token_call_credentials(credential)
        )
    return grpc.secure_channel(target, tls)


def read_credential(key_file: Path | None, environ: Mapping[str, str]) -> str | None:
    """The credential from --key-file, else from $KAIZEN_API_KEY, else None."""
    secret = read_secret(key_file, CREDENTIAL_ENV, "--key-file", environ)
    return secret.decode() if secret is not None else None
