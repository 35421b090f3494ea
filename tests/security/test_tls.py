"""TLS and mutual TLS on the gRPC port, with a throw-away CA made for each test."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest

from kaizen.client import connect
from kaizen.v1 import chat_pb2_grpc
from tests.conftest import ask

x509 = pytest.importorskip(
    "cryptography.x509", reason="the dev extra `cryptography` makes the certificates"
)


def make_pki(out: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(subject, key, issuer, issuer_key, ca: bool, usage=None, sans=None):
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if usage:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(path: Path, obj) -> Path:
        if hasattr(obj, "private_bytes"):
            data = obj.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        else:
            data = obj.public_bytes(serialization.Encoding.PEM)
        path.write_bytes(data)
        return path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = cert(name("kaizen test CA"), ca_key, name("kaizen test CA"), ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = cert(
        name("localhost"),
        server_key,
        ca.subject,
        ca_key,
        False,
        ExtendedKeyUsageOID.SERVER_AUTH,
        sans,
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = cert(
        name("frontend"), client_key, ca.subject, ca_key, False, ExtendedKeyUsageOID.CLIENT_AUTH
    )
    return {
        "ca": write(out / "ca.pem", ca),
        "server_cert": write(out / "server.pem", server),
        "server_key": write(out / "server.key", server_key),
        "client_cert": write(out / "client.pem", client),
        "client_key": write(out / "client.key", client_key),
    }


def generate(channel: grpc.Channel) -> grpc.StatusCode:
    try:
        chat_pb2_grpc.ChatServiceStub(channel).Generate(ask(max_new_tokens=2), timeout=10)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
def test_tls_refuses_plaintext_and_mtls_refuses_a_client_without_a_certificate(
    serve_config, api_key, tmp_path, mutual
):
    from server.app import start

    pki = make_pki(tmp_path)
    config = dataclasses.replace(
        serve_config,
        tls_cert=pki["server_cert"],
        tls_key=pki["server_key"],
        tls_client_ca=pki["ca"] if mutual else None,
    )
    running = start(config)
    target = f"127.0.0.1:{running.port}"
    ca = pki["ca"].read_bytes()
    try:
        with connect(target, api_key) as plaintext:
            assert generate(plaintext) == grpc.StatusCode.UNAVAILABLE
        with connect(target, api_key, root_ca=ca) as anonymous_client:
            expected = grpc.StatusCode.UNAVAILABLE if mutual else grpc.StatusCode.OK
            assert generate(anonymous_client) == expected
        certificate = {
            "client_cert": pki["client_cert"].read_bytes(),
            "client_key": pki["client_key"].read_bytes(),
        }
        with connect(target, api_key, root_ca=ca, **certificate) as with_certificate:
            assert generate(with_certificate) == grpc.StatusCode.OK
        with connect(target, None, root_ca=ca, **certificate) as no_key:
            # TLS says who connects, not who may chat: the API key is still needed
            assert generate(no_key) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        running.stop(grace_s=1)


def test_tls_flags_come_in_pairs(serve_config, tmp_path):
    with pytest.raises(ValueError, match="--tls-cert and --tls-key"):
        dataclasses.replace(serve_config, tls_cert=tmp_path / "c.pem")
    with pytest.raises(ValueError, match="--tls-client-ca"):
        dataclasses.replace(serve_config, tls_client_ca=tmp_path / "ca.pem")
