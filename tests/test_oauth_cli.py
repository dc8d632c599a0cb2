"""``spauth apps`` and ``spauth users`` as subprocesses against a real ``spauth serve``, and the
OAuth flow against its HTTP port with authlib."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import requests
from authlib.common.security import generate_token
from authlib.integrations.requests_client import OAuth2Session

from sidecar._gen.statuspulse.auth.v1 import authorization_pb2 as authz_pb
from sidecar._gen.statuspulse.auth.v1 import authorization_pb2_grpc as authz_grpc
from tests.conftest import free_port, wait_until
from tests.support.ports import wait_for_port
from tests.test_oauth_flow import PASSWORD, REDIRECT, form_fields, query


@dataclass
class Serve:
    proc: subprocess.Popen[str]
    endpoint: str
    issuer: str
    sidecar: str
    data_dir: Path
    log_path: Path
    operator_key: str
    secrets: list[str] = field(default_factory=list)

    def spauth(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "SPAUTH_ENDPOINT": self.endpoint,
            "STATUSPULSE_API_KEY": self.operator_key,
        }
        return subprocess.run(
            [sys.executable, "-m", "sidecar", *args],
            env=env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def json(self, *args: str, stdin: str = "") -> object:
        out = self.spauth(*args, "--output", "json", stdin=stdin)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    data_dir = tmp_path / "data"
    log_path = tmp_path / "serve.log"
    admin, http, sidecar = free_port(), free_port(), free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sidecar",
                "serve",
                "--data-dir",
                str(data_dir),
                "--admin-addr",
                f"127.0.0.1:{admin}",
                "--http-addr",
                f"127.0.0.1:{http}",
                "--sidecar-addr",
                f"127.0.0.1:{sidecar}",
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    try:
        wait_for_port("127.0.0.1", admin, timeout=30)
        wait_for_port("127.0.0.1", http, timeout=30)
        wait_for_port("127.0.0.1", sidecar, timeout=30)
        assert proc.poll() is None, log_path.read_text()[-3000:]
        key = (data_dir / "bootstrap-key").read_text().strip()
        yield Serve(
            proc,
            f"127.0.0.1:{admin}",
            f"http://127.0.0.1:{http}",
            f"127.0.0.1:{sidecar}",
            data_dir,
            log_path,
            key,
        )
    finally:
        proc.terminate()
        proc.communicate(timeout=15)


def _authorize(serve: Serve, token: str) -> tuple[bool, str]:
    """Ask the embedded sidecar (in-cluster AuthorizationService) about an access token."""
    with grpc.insecure_channel(serve.sidecar) as channel:
        stub = authz_grpc.AuthorizationServiceStub(channel)
        resp = stub.Authorize(
            authz_pb.AuthorizeRequest(credential=token, required_scopes=["dashboard:read"]),
            timeout=10,
        )
    return resp.allowed, resp.reason


def _browser_flow(serve: Serve, client: OAuth2Session) -> dict[str, str]:
    verifier = generate_token(48)
    url, _ = client.create_authorization_url(
        serve.issuer + "/oauth/authorize", code_verifier=verifier
    )
    browser = requests.Session()
    page = browser.get(url, timeout=10)
    signed_in = browser.post(
        serve.issuer + "/oauth/authorize",
        data=[*form_fields(page.text).fields, ("email", "dev@acme.test"), ("password", PASSWORD)],
        allow_redirects=False,
        timeout=10,
    )
    consent = browser.get(serve.issuer + signed_in.headers["location"], timeout=10)
    done = browser.post(
        serve.issuer + "/oauth/authorize",
        data=[*form_fields(consent.text).fields, ("action", "approve")],
        allow_redirects=False,
        timeout=10,
    )
    location = done.headers["location"]
    serve.secrets.append(query(location)["code"])
    token = client.fetch_token(
        serve.issuer + "/oauth/token", authorization_response=location, code_verifier=verifier
    )
    serve.secrets.append(token["refresh_token"])
    return dict(token)


def test_apps_and_users_lifecycle_through_the_cli(serve: Serve) -> None:
    user = serve.json(
        "users", "create", "--workspace", "acme", "--email", "Dev@Acme.test", stdin=PASSWORD + "\n"
    )
    assert isinstance(user, dict) and user["email"] == "dev@acme.test"
    assert "admin:full" not in user["scopes"] and "dashboard:read" in user["scopes"]
    duplicate = serve.spauth(
        "users", "create", "--workspace", "acme", "--email", "dev@acme.test", stdin=PASSWORD
    )
    assert duplicate.returncode == 1 and "ALREADY_EXISTS" in duplicate.stderr
    weak = serve.spauth(
        "users", "create", "--workspace", "acme", "--email", "x@acme.test", stdin="short\n"
    )
    assert weak.returncode == 1 and "password" in weak.stderr

    app = serve.json(
        "apps",
        "register",
        "--workspace",
        "acme",
        "--name",
        "Status dashboard",
        "--redirect-uri",
        REDIRECT,
        "--redirect-uri",
        "https://dash.example/cb",
        "--scope",
        "dashboard:read",
        "--scope",
        "alerts:manage",
        "--confidential",
    )
    assert isinstance(app, dict)
    client_id, secret = app["client_id"], app["client_secret"]
    serve.secrets.append(secret)
    assert secret.startswith("spcs_") and app["confidential"] is True
    assert app["redirect_uris"] == [REDIRECT, "https://dash.example/cb"]
    shown = serve.json("apps", "show", client_id)
    assert isinstance(shown, dict) and "client_secret" not in shown
    assert shown["secret_last_four"] == secret[-4:]
    listed = serve.json("apps", "list", "--workspace", "acme")
    assert [a["client_id"] for a in listed] == [client_id]  # type: ignore[union-attr]

    client = OAuth2Session(
        client_id,
        secret,
        scope="dashboard:read",
        redirect_uri=REDIRECT,
        code_challenge_method="S256",
    )
    token = _browser_flow(serve, client)

    sessions = serve.json("apps", "sessions", client_id)
    assert isinstance(sessions, list) and len(sessions) == 1
    assert sessions[0]["email"] == "dev@acme.test" and sessions[0]["scopes"] == ["dashboard:read"]
    grant_id = sessions[0]["grant_id"]
    table = serve.spauth("apps", "sessions", client_id)
    assert "dev@acme.test" in table.stdout and grant_id in table.stdout

    # Rotation with overlap: the old secret keeps working for now.
    rotated = serve.json("apps", "rotate-secret", client_id, "--overlap", "1h")
    assert isinstance(rotated, dict) and rotated["client_secret"] != secret
    serve.secrets.append(rotated["client_secret"])
    refreshed = client.refresh_token(
        serve.issuer + "/oauth/token", refresh_token=token["refresh_token"]
    )
    serve.secrets.append(refreshed["refresh_token"])
    new_client = OAuth2Session(client_id, rotated["client_secret"])
    info = new_client.introspect_token(
        serve.issuer + "/oauth/introspect", token=refreshed["access_token"]
    )
    assert info.json()["active"] is True

    # The embedded sidecar verifies the token with the keys it replicated.
    wait_until(lambda: _authorize(serve, refreshed["access_token"])[0], timeout=10)

    # An admin revokes the session: refresh stops, introspection says inactive, the sidecar
    # denies the token.
    revoked = serve.json("apps", "revoke-session", grant_id)
    assert isinstance(revoked, dict) and revoked["revoked_at"]
    assert serve.json("apps", "sessions", client_id) == []
    info = new_client.introspect_token(
        serve.issuer + "/oauth/introspect", token=refreshed["access_token"]
    )
    assert info.json() == {"active": False}
    with pytest.raises(Exception, match="invalid_grant"):
        new_client.refresh_token(
            serve.issuer + "/oauth/token", refresh_token=refreshed["refresh_token"]
        )

    # Rotation without overlap: the previous secret stops at once.
    again = serve.json("apps", "rotate-secret", client_id, "--overlap", "0s")
    assert isinstance(again, dict)
    serve.secrets.append(again["client_secret"])
    stale = requests.post(
        serve.issuer + "/oauth/introspect",
        data={"token": "x"},
        auth=(client_id, rotated["client_secret"]),
        timeout=10,
    )
    assert stale.status_code == 401

    deleted = serve.spauth("apps", "delete", client_id)
    assert deleted.returncode == 0
    gone = serve.spauth("apps", "show", client_id)
    assert gone.returncode == 1 and "NOT_FOUND" in gone.stderr

    _assert_no_secret_leaks(serve)


def test_cli_rejects_bad_registrations(serve: Serve) -> None:
    cases = [
        (
            ["--redirect-uri", "http://evil.example/cb", "--scope", "dashboard:read"],
            "redirect_uris",
        ),
        (["--redirect-uri", "https://a.example/cb#frag", "--scope", "dashboard:read"], "fragment"),
        (["--redirect-uri", REDIRECT, "--scope", "root"], "valid:"),
    ]
    for extra, needle in cases:
        out = serve.spauth("apps", "register", "--workspace", "acme", "--name", "x", *extra)
        assert out.returncode == 1 and needle in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
    public = serve.json(
        "apps",
        "register",
        "--workspace",
        "acme",
        "--name",
        "cli tool",
        "--redirect-uri",
        REDIRECT,
        "--scope",
        "checks:read",
    )
    assert isinstance(public, dict) and "client_secret" not in public
    no_secret = serve.spauth("apps", "rotate-secret", public["client_id"])
    assert no_secret.returncode == 1 and "FAILED_PRECONDITION" in no_secret.stderr
    no_password = serve.spauth("users", "create", "--workspace", "acme", "--email", "a@acme.test")
    assert no_password.returncode == 2 and "stdin" in no_password.stderr


def _assert_no_secret_leaks(serve: Serve) -> None:
    """No client secret, code, refresh token or password in the database, its WAL or the logs."""
    serve.proc.terminate()
    serve.proc.wait(15)
    blobs = [p.read_bytes() for p in serve.data_dir.glob("spauth.db*")]
    blobs.append(serve.log_path.read_bytes())
    with sqlite3.connect(serve.data_dir / "spauth.db") as conn:
        audit = conn.execute("SELECT * FROM audit_events").fetchall()
        actions = {row[4] for row in audit}
    blobs.append(repr(audit).encode())
    assert {"app.registered", "app.secret_rotated", "app.deleted", "user.created"} <= actions
    assert {"signin.succeeded", "consent.granted", "token.issued", "token.refreshed"} <= actions
    assert "grant.revoked" in actions
    assert len(serve.secrets) >= 6
    for secret in [*serve.secrets, PASSWORD]:
        for blob in blobs:
            assert secret.encode() not in blob
