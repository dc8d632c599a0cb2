"""TLS from configured files: the admin API (and the sync stream it carries) with mTLS, the
sidecar syncing over it, and the HTTP port. Certificates are minted per test by a throwaway CA."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2 as pb
from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2_grpc
from sidecar.config import ConfigError, load_settings, load_sidecar_settings
from sidecar.controlplane import ControlPlane
from tests.conftest import LoopThread
from tests.support.ops import (
    bearer,
    call_check,
    check_request,
    create_key,
    http_get,
    running_sidecar,
    sidecar_settings,
    wait_until,
)
from tests.support.sync import TEST_SYNC_TOKEN


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    usage: x509.ObjectIdentifier | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer or (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Path:
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("spauth test CA", ca_key, None, ca=True)
    issuer = (ca.subject, ca_key)
    out = tmp_path / "pki"
    out.mkdir()
    server_key = ec.generate_private_key(ec.SECP256R1())
    client_key = ec.generate_private_key(ec.SECP256R1())
    server = _issue("control-plane", server_key, issuer, usage=ExtendedKeyUsageOID.SERVER_AUTH)
    client = _issue("sidecar", client_key, issuer, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    _write(out / "ca.pem", ca, ca_key)
    _write(out / "server.pem", server, server_key)
    _write(out / "client.pem", client, client_key)
    return Pki(
        out / "ca.pem", out / "server.pem", out / "server.key", out / "client.pem",
        out / "client.key",
    )  # fmt: skip


@dataclass
class TlsPlane:
    plane: ControlPlane
    address: str
    operator_key: str


@pytest.fixture
def tls_plane(tmp_path: Path, pki: Pki, loop_thread: LoopThread) -> Iterator[TlsPlane]:
    data = tmp_path / "cp"
    data.mkdir()
    settings = load_settings(
        {
            "data_dir": str(data),
            "admin_addr": "127.0.0.1:0",
            "http_addr": "127.0.0.1:0",
            "admin_tls_cert": str(pki.server_cert),
            "admin_tls_key": str(pki.server_key),
            "admin_tls_client_ca": str(pki.ca),
            "http_tls_cert": str(pki.server_cert),
            "http_tls_key": str(pki.server_key),
            "sync_token": TEST_SYNC_TOKEN,
        },
        environ={},
    )
    plane = ControlPlane(settings)
    minted = plane.bootstrap()
    assert minted is not None
    loop_thread.run(plane.start())
    yield TlsPlane(plane, f"127.0.0.1:{plane.admin_port}", minted.secret)
    loop_thread.run(plane.aclose(grace=0))


def _client_credentials(pki: Pki, with_cert: bool = True) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=pki.client_key.read_bytes() if with_cert else None,
        certificate_chain=pki.client_cert.read_bytes() if with_cert else None,
    )


def test_sidecar_syncs_over_mtls(tls_plane: TlsPlane, pki: Pki, tmp_path: Path) -> None:
    creds = _client_credentials(pki)
    secret, _ = create_key(
        tls_plane.address, tls_plane.operator_key, ["checks:read"], credentials=creds
    )
    settings = sidecar_settings(
        tls_plane.address,
        tmp_path / "sc",
        control_plane_tls_ca=str(pki.ca),
        control_plane_tls_cert=str(pki.client_cert),
        control_plane_tls_key=str(pki.client_key),
    )
    with running_sidecar(settings) as sidecar:
        wait_until(sidecar.ready, what="replica synced over mTLS")
        response = call_check(
            sidecar.port, check_request("/v1/workspaces/acme/checks/1", bearer(secret))
        )
        assert response.status.code == 0


def test_admin_api_refuses_clients_without_a_certificate(tls_plane: TlsPlane, pki: Pki) -> None:
    request = pb.ListApiKeysRequest()
    md = (("authorization", f"Bearer {tls_plane.operator_key}"),)
    for channel in (
        grpc.insecure_channel(tls_plane.address),
        grpc.secure_channel(tls_plane.address, _client_credentials(pki, with_cert=False)),
    ):
        with channel, pytest.raises(grpc.RpcError) as err:
            api_keys_pb2_grpc.ApiKeyServiceStub(channel).ListApiKeys(
                request, metadata=md, timeout=3
            )
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE


def test_sidecar_without_client_certificate_never_loads(
    tls_plane: TlsPlane, pki: Pki, tmp_path: Path
) -> None:
    settings = sidecar_settings(
        tls_plane.address, tmp_path / "sc", control_plane_tls_ca=str(pki.ca)
    )
    with running_sidecar(settings) as sidecar:
        wait_until(lambda: sidecar.sync.reconnects >= 2, what="handshakes refused")
        assert not sidecar.replica.loaded
        assert not sidecar.ready()


def test_http_port_serves_tls(tls_plane: TlsPlane, pki: Pki) -> None:
    context = ssl.create_default_context(cafile=str(pki.ca))
    url = f"https://127.0.0.1:{tls_plane.plane.http_port}"
    assert http_get(url + "/healthz", context)[0] == 200
    assert http_get(url + "/readyz", context)[0] == 200
    with pytest.raises(ConnectionError):  # a plaintext request gets the connection closed
        http_get(f"http://127.0.0.1:{tls_plane.plane.http_port}/healthz")


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"admin_tls_cert": "CERT"}, "admin_tls_key: set both admin_tls_cert and admin_tls_key"),
        ({"admin_tls_client_ca": "CA"}, "admin_tls_client_ca: mTLS needs admin_tls_cert"),
        ({"http_tls_key": "KEY"}, "http_tls_cert: set both"),
        ({"admin_tls_cert": "/nonexistent.pem"}, "admin_tls_cert: no such file '/nonexistent.pem'"),
    ],
)
def test_tls_settings_are_validated(values: dict[str, str], needle: str, pki: Pki) -> None:
    files = {"CERT": str(pki.server_cert), "KEY": str(pki.server_key), "CA": str(pki.ca)}
    with pytest.raises(ConfigError) as err:
        load_settings({k: files.get(v, v) for k, v in values.items()}, environ={})
    assert needle in str(err.value)


def test_sidecar_client_certificate_needs_a_ca(pki: Pki) -> None:
    with pytest.raises(ConfigError, match="control_plane_tls_cert: a client certificate needs"):
        load_sidecar_settings(
            {
                "control_plane_tls_cert": str(pki.client_cert),
                "control_plane_tls_key": str(pki.client_key),
            },
            environ={},
        )
