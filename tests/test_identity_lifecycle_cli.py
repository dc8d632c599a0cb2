"""Issue 14 end to end, against a real ``spauth serve`` (HTTP port, admin API, embedded sidecar)
driven by the CLI as subprocesses: offboarding a member, break-glass recovery of the operator
key, ``rotate-signing-key --now`` against a sidecar that had cached a token, and a store file with
no private key in clear."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from authlib.integrations.requests_client import OAuth2Session

from tests.conftest import wait_until
from tests.test_oauth_cli import Serve, _authorize, _browser_flow
from tests.test_oauth_cli import serve as serve
from tests.test_oauth_flow import PASSWORD, REDIRECT, form_fields


def _member_and_app(serve: Serve) -> tuple[str, OAuth2Session]:
    user = serve.json(
        "users", "create", "--workspace", "acme", "--email", "dev@acme.test", stdin=PASSWORD
    )
    app = serve.json(
        "apps", "register", "--workspace", "acme", "--name", "Dashboard",
        "--redirect-uri", REDIRECT, "--scope", "dashboard:read", "--confidential",
    )  # fmt: skip
    assert isinstance(user, dict) and isinstance(app, dict)
    serve.secrets.append(app["client_secret"])
    client = OAuth2Session(
        app["client_id"],
        app["client_secret"],
        scope="dashboard:read",
        redirect_uri=REDIRECT,
        code_challenge_method="S256",
    )
    return str(user["id"]), client


def _sidecar_reason(serve: Serve, token: str) -> str:
    allowed, reason = _authorize(serve, token)
    return "ok" if allowed else reason


def _sign_in_status(serve: Serve, client: OAuth2Session, password: str = PASSWORD) -> int:
    url, _ = client.create_authorization_url(
        serve.issuer + "/oauth/authorize", code_verifier="v" * 48
    )
    browser = requests.Session()
    page = browser.get(url, timeout=10)
    fields = [*form_fields(page.text).fields, ("email", "dev@acme.test"), ("password", password)]
    answer = browser.post(
        serve.issuer + "/oauth/authorize", data=fields, allow_redirects=False, timeout=10
    )
    return answer.status_code


def test_a_disabled_member_is_offboarded_everywhere(serve: Serve) -> None:
    user_id, client = _member_and_app(serve)
    token = _browser_flow(serve, client)
    wait_until(lambda: _sidecar_reason(serve, token["access_token"]) == "ok", timeout=10)
    listed = serve.json("users", "list", "--workspace", "acme")
    assert isinstance(listed, list) and listed[0]["state"] == "active"
    assert listed[0]["last_sign_in_at"] and listed[0]["created_at"]
    table = serve.spauth("users", "list", "--workspace", "acme")
    assert "LAST SIGN-IN" in table.stdout and "active" in table.stdout

    disabled = serve.json("users", "disable", user_id)
    assert isinstance(disabled, dict)
    assert disabled["state"] == "disabled" and disabled["grants_revoked"] == 1
    # The sidecar had verified (and cached) the token: the revocation reaches it anyway.
    wait_until(lambda: _sidecar_reason(serve, token["access_token"]) == "token_revoked", timeout=10)
    with pytest.raises(Exception, match="invalid_grant"):
        client.refresh_token(serve.issuer + "/oauth/token", refresh_token=token["refresh_token"])
    assert _sign_in_status(serve, client) == 401

    # Enabled again: signing in works, the old grant stays revoked.
    assert serve.json("users", "enable", user_id)["state"] == "active"  # type: ignore[index]
    assert _sign_in_status(serve, client) == 303
    with pytest.raises(Exception, match="invalid_grant"):
        client.refresh_token(serve.issuer + "/oauth/token", refresh_token=token["refresh_token"])

    # A password reset signs the member out of the new grant too.
    fresh = _browser_flow(serve, client)
    reset = serve.json("users", "reset-password", user_id, stdin="a new long passphrase 42\n")
    assert isinstance(reset, dict) and reset["grants_revoked"] == 1
    assert _sign_in_status(serve, client) == 401
    assert _sign_in_status(serve, client, "a new long passphrase 42") == 303
    wait_until(lambda: _sidecar_reason(serve, fresh["access_token"]) == "token_revoked", timeout=10)

    deleted = serve.json("users", "delete", user_id)
    assert isinstance(deleted, dict) and deleted["state"] == "deleted"
    assert serve.json("users", "list", "--workspace", "acme") == []
    again = serve.spauth("users", "disable", user_id)
    assert again.returncode == 1 and "NOT_FOUND" in again.stderr
    # The e-mail address is free again; the history keeps the old member's id.
    serve.json("users", "create", "--workspace", "acme", "--email", "dev@acme.test", stdin=PASSWORD)
    with sqlite3.connect(serve.data_dir / "spauth.db") as conn:
        trail = conn.execute(
            "SELECT action FROM audit_events WHERE target = ? ORDER BY seq", (user_id,)
        ).fetchall()
    actions = [a for (a,) in trail]
    assert actions[0] == "user.created" and actions[-1] == "user.deleted"
    assert {"user.disabled", "user.enabled", "user.password_reset"} <= set(actions)


def _break_glass(data_dir: Path) -> subprocess.CompletedProcess[str]:
    """``spauth operator mint`` with local access to the store only: no key, no endpoint."""
    env = {k: v for k, v in os.environ.items() if k not in ("STATUSPULSE_API_KEY",)}
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "operator", "mint", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def test_a_revoked_operator_key_is_recovered_with_break_glass(serve: Serve) -> None:
    keys = serve.json("keys", "list", "--workspace", "*")
    assert isinstance(keys, list) and len(keys) == 1
    operator_id = keys[0]["id"]
    refused = serve.spauth("keys", "revoke", operator_id)
    assert refused.returncode == 1 and "FAILED_PRECONDITION" in refused.stderr
    assert "last usable operator key" in refused.stderr

    # Two operator keys at once (rotation without a gap), never three.
    second = serve.json(
        "keys", "create", "--workspace", "*", "--name", "second", "--scope", "admin:full"
    )
    assert isinstance(second, dict) and second["workspace"] == "*"
    serve.secrets.append(second["key"])
    third = serve.spauth(
        "keys", "create", "--workspace", "*", "--name", "third", "--scope", "admin:full"
    )
    assert third.returncode == 1 and "FAILED_PRECONDITION" in third.stderr
    assert serve.spauth("keys", "revoke", second["id"]).returncode == 0
    assert serve.spauth("keys", "revoke", operator_id, "--force").returncode == 0

    locked = serve.spauth("keys", "list")
    assert locked.returncode == 1 and "UNAUTHENTICATED" in locked.stderr

    minted = _break_glass(serve.data_dir)
    assert minted.returncode == 0, minted.stderr
    recovered = minted.stdout.strip()
    assert recovered.startswith("spk_") and len(recovered.splitlines()) == 1
    serve.secrets.append(recovered)
    serve.operator_key = recovered
    listed = serve.json("keys", "list", "--workspace", "*")
    assert isinstance(listed, list) and any(k["name"] == "break-glass" for k in listed)
    wrong_dir = _break_glass(serve.data_dir / "elsewhere")
    assert wrong_dir.returncode == 2 and "no store" in wrong_dir.stderr
    with sqlite3.connect(serve.data_dir / "spauth.db") as conn:
        rows = conn.execute(
            "SELECT actor, reason, metadata FROM audit_events WHERE action = 'key.created' "
            "AND actor = 'break-glass'"
        ).fetchall()
    assert len(rows) == 1 and "break-glass" in rows[0][1]


def test_rotate_now_denies_tokens_a_sidecar_had_cached(serve: Serve) -> None:
    _, client = _member_and_app(serve)
    token = _browser_flow(serve, client)
    wait_until(lambda: _sidecar_reason(serve, token["access_token"]) == "ok", timeout=10)
    assert _sidecar_reason(serve, token["access_token"]) == "ok"  # now cached
    before = serve.json("oauth", "signing-keys")
    assert isinstance(before, list) and [k["state"] for k in before] == ["current"]

    rotated = serve.json("oauth", "rotate-signing-key", "--now")
    assert isinstance(rotated, dict) and rotated["retired"] == [before[0]["kid"]]
    assert rotated["key"]["state"] == "current"
    wait_until(lambda: _sidecar_reason(serve, token["access_token"]) == "unknown_key", timeout=10)
    # New tokens are signed with the new key, which every sidecar knows.
    refreshed = client.refresh_token(
        serve.issuer + "/oauth/token", refresh_token=token["refresh_token"]
    )
    serve.secrets.append(refreshed["refresh_token"])
    wait_until(lambda: _sidecar_reason(serve, refreshed["access_token"]) == "ok", timeout=10)
    jwks = requests.get(serve.issuer + "/.well-known/jwks.json", timeout=10).json()
    assert [k["kid"] for k in jwks["keys"]] == [rotated["key"]["kid"]]

    # A scheduled rotation publishes first: pending, while the current key keeps signing.
    scheduled = serve.json("oauth", "rotate-signing-key")
    assert isinstance(scheduled, dict) and scheduled["key"]["state"] == "pending"
    jwks = requests.get(serve.issuer + "/.well-known/jwks.json", timeout=10).json()
    assert len(jwks["keys"]) == 2

    # The store holds no private key in clear: encrypted under the KEK, or destroyed.
    kek_path = serve.data_dir / "key-encryption-key"
    assert stat.S_IMODE(kek_path.stat().st_mode) == 0o600
    kek = kek_path.read_text().strip()
    serve.proc.terminate()
    serve.proc.wait(15)
    with sqlite3.connect(serve.data_dir / "spauth.db") as conn:
        stored = dict(conn.execute("SELECT kid, private_pem FROM oauth_signing_keys").fetchall())
    assert stored[before[0]["kid"]] == b""
    assert all(v == b"" or bytes(v).startswith(b"spk1.") for v in stored.values())
    for path in serve.data_dir.rglob("*"):
        if path.is_file() and path != kek_path:
            blob = path.read_bytes()
            assert b"PRIVATE KEY" not in blob, path
            assert kek.encode() not in blob, path
