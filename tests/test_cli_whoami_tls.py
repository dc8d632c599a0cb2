"""``spauth whoami``, ``spauth keys verify`` and the CLI's TLS options, against real control
planes on port 0: plaintext, TLS and mTLS admin ports (certificates from a throwaway CA)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.cli.main import main
from sidecar.cli.whoami import EXIT_DENIED
from sidecar.config import load_settings
from sidecar.controlplane import ControlPlane
from tests.conftest import LoopThread, RunningControlPlane
from tests.test_ops_tls import Pki, pki  # noqa: F401 (the fixture)


def run(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    *argv: str,
    key: str = "",
    stdin: str = "",
) -> tuple[int, str, str]:
    monkeypatch.setenv("STATUSPULSE_API_KEY", key)
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_whoami_and_verify_answer_for_the_key_and_the_route(
    control_plane: RunningControlPlane,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ep = ["--endpoint", control_plane.address]
    op = control_plane.operator_key
    code, out, _ = run(
        capsys, monkeypatch, "keys", "create", *ep, "--workspace", "acme", "--name", "ci",
        "--scope", "checks:read", "-o", "json", key=op,
    )  # fmt: skip
    assert code == 0
    secret = json.loads(out)["key"]
    code, out, _ = run(capsys, monkeypatch, "whoami", *ep, "-o", "json", key=secret)
    me = json.loads(out)
    assert (code, me["workspace"], me["scopes"], me["state"]) == (
        0,
        "acme",
        ["checks:read"],
        "active",
    )
    assert "key" not in me and "decision" not in me
    route = ["--method", "GET", "--path", "/v1/workspaces/acme/checks"]
    code, out, _ = run(capsys, monkeypatch, "keys", "verify", *ep, *route, stdin=secret + "\n")
    assert code == 0 and "decision:   allow 200 ok" in out
    assert secret not in out
    route = ["--method", "POST", "--path", "/v1/workspaces/acme/checks"]
    code, out, _ = run(
        capsys, monkeypatch, "keys", "verify", *ep, *route, "-o", "json", stdin=secret
    )
    decision = json.loads(out)["decision"]
    assert code == EXIT_DENIED
    assert (decision["reason"], decision["required_scopes"]) == (
        "insufficient_scope",
        ["checks:write"],
    )
    code, _, err = run(capsys, monkeypatch, "keys", "verify", *ep, stdin="spk_wrong\n")
    assert code == 1 and "UNAUTHENTICATED" in err
    code, _, err = run(capsys, monkeypatch, "keys", "verify", *ep, stdin="")
    assert code == 2 and "stdin" in err


def _plane(tmp_path: Path, loop: LoopThread, pki: Pki, mtls: bool) -> Iterator[tuple[str, str]]:  # noqa: F811
    data = tmp_path / ("mtls" if mtls else "tls")
    data.mkdir()
    values = {
        "data_dir": str(data),
        "admin_addr": "127.0.0.1:0",
        "http_addr": "127.0.0.1:0",
        "admin_tls_cert": str(pki.server_cert),
        "admin_tls_key": str(pki.server_key),
    }
    if mtls:
        values["admin_tls_client_ca"] = str(pki.ca)
    plane = ControlPlane(load_settings(values, environ={}))
    minted = plane.bootstrap()
    assert minted is not None
    loop.run(plane.start())
    yield f"localhost:{plane.admin_port}", minted.secret
    loop.run(plane.aclose(grace=0))


@pytest.fixture
def tls_admin(tmp_path: Path, loop_thread: LoopThread, pki: Pki) -> Iterator[tuple[str, str]]:  # noqa: F811
    yield from _plane(tmp_path, loop_thread, pki, mtls=False)


@pytest.fixture
def mtls_admin(tmp_path: Path, loop_thread: LoopThread, pki: Pki) -> Iterator[tuple[str, str]]:  # noqa: F811
    yield from _plane(tmp_path, loop_thread, pki, mtls=True)


def test_tls_admin_port_with_the_ca_from_a_flag_or_the_environment(
    tls_admin: tuple[str, str],
    pki: Pki,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoint, op = tls_admin
    code, out, _ = run(
        capsys, monkeypatch, "whoami", "--endpoint", endpoint, "--tls-ca", str(pki.ca), key=op
    )
    assert code == 0 and "workspace:  *" in out
    code, _, _ = run(capsys, monkeypatch, "whoami", "--endpoint", endpoint, key=op)
    assert code != 0  # plaintext to a TLS port
    monkeypatch.setenv("SPAUTH_TLS_CA", str(pki.ca))
    code, out, _ = run(capsys, monkeypatch, "whoami", "--endpoint", endpoint, key=op)
    assert code == 0


def test_mtls_admin_port_needs_the_client_certificate(
    mtls_admin: tuple[str, str],
    pki: Pki,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoint, op = mtls_admin
    ca = ["--endpoint", endpoint, "--tls-ca", str(pki.ca)]
    code, _, _ = run(capsys, monkeypatch, "whoami", *ca, key=op)
    assert code != 0  # no client certificate
    client = ["--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
    code, out, _ = run(capsys, monkeypatch, "whoami", *ca, *client, key=op)
    assert code == 0 and "workspace:  *" in out
    code, _, err = run(
        capsys, monkeypatch, "whoami", *ca, "--tls-cert", str(pki.client_cert), key=op
    )
    assert code == 2 and "--tls-key" in err
    code, _, err = run(
        capsys, monkeypatch, "whoami", "--endpoint", endpoint, "--tls-ca", "/nope", key=op
    )
    assert code == 2 and "/nope" in err
