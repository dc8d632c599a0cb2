"""The issue's end-to-end flow: authlib against the control plane's OAuth endpoints, then API
calls through a real Envoy whose ext_authz is the sidecar, which verifies the JWT with keys from
its replica and learns revocations through the replication stream."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from sidecar.config import SidecarSettings
from sidecar.dataplane.process import Sidecar
from sidecar.devtools.echo_upstream import EchoUpstream
from tests.conftest import wait_until
from tests.support.envoy import EnvoyProcess
from tests.test_oauth_flow import OAuthEnv, tokens
from tests.test_oauth_flow import oauth_env as oauth_env  # the fixture

pytestmark = pytest.mark.envoy
CHECKS = "/v1/workspaces/acme/checks"
METRICS = "/v1/workspaces/acme/metrics"


@dataclass
class OAuthStack:
    env: OAuthEnv
    sidecar: Sidecar
    envoy: EnvoyProcess

    def call(self, token: str, path: str = CHECKS) -> tuple[int, dict[str, Any]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.envoy.listen_port, timeout=10)
        try:
            conn.request("GET", path, headers={"authorization": f"Bearer {token}"})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"{}")
        finally:
            conn.close()

    def reason(self, token: str, path: str = CHECKS) -> tuple[int, str]:
        status, body = self.call(token, path)
        return status, str(body.get("reason", ""))


@pytest.fixture
def stack(oauth_env: OAuthEnv, tmp_path: Path) -> Iterator[OAuthStack]:
    sidecar = Sidecar(
        SidecarSettings(
            listen="127.0.0.1:0",
            control_plane=oauth_env.admin,
            state_dir=tmp_path / "sidecar",
            sync_token=oauth_env.plane.sync_token,
            metrics_addr="127.0.0.1:0",
            oauth_issuer=oauth_env.issuer,
            # The tests move the shared fake clock by hours; staleness is not under test here.
            max_staleness=0,
            usage_report_interval=0.05,
        ),
        clock=oauth_env.clock,
    )
    sidecar.start()
    try:
        wait_until(lambda: sidecar.replica.loaded and sidecar.replica.signing_keys)
        with (
            EchoUpstream() as echo,
            EnvoyProcess(
                authz=("127.0.0.1", sidecar.port), upstream=("127.0.0.1", echo.port)
            ) as envoy,
        ):
            yield OAuthStack(oauth_env, sidecar, envoy)
    finally:
        sidecar.stop(grace=0.5)


def test_authorize_call_refresh_reuse_revoke_through_envoy(stack: OAuthStack) -> None:
    env = stack.env
    client_id, secret = env.register(scopes=["checks:read", "metrics:read"])
    user_id = env.member()
    client = env.client(client_id, secret, scope="checks:read")
    first = tokens(env, client)
    access = str(first["access_token"])

    # 200 with the right scope; the upstream sees who, never the token.
    status, body = stack.call(access)
    assert status == 200
    echoed = body["headers"]
    assert echoed["x-statuspulse-subject"] == user_id
    assert echoed["x-statuspulse-workspace"] == "acme"
    assert echoed["x-statuspulse-scopes"] == "checks:read"
    assert "authorization" not in echoed and "x-statuspulse-key-id" not in echoed
    assert access not in json.dumps(body)
    # 403 without it, or in another workspace.
    assert stack.reason(access, METRICS) == (403, "insufficient_scope")
    assert stack.reason(access, "/v1/workspaces/globex/checks") == (403, "workspace_mismatch")
    # Those two repeats of a verified token were decided by the compiled path (when built).
    fast = stack.sidecar.fast_check
    if fast is not None:
        assert fast.counts()[0] >= 2
        assert fast.observed_in_c  # the sidecar's own observers
        observed = fast.observed()
        assert stack.call(access)[0] == 200
        assert fast.observed() == observed + 1  # a cached token's allow is observed in C too

    # Refresh: the new access token works too.
    refreshed = client.refresh_token(env.url("/oauth/token"), refresh_token=first["refresh_token"])
    assert stack.call(refreshed["access_token"])[0] == 200

    # Reuse of the rotated refresh token revokes the grant; every sidecar denies its tokens as
    # soon as the change arrives (pushed on commit; the bound here is generous for CI).
    reuse = requests.post(
        env.url("/oauth/token"),
        data={"grant_type": "refresh_token", "refresh_token": str(first["refresh_token"])},
        auth=(client_id, secret),
        timeout=10,
    )
    assert reuse.json()["error"] == "invalid_grant"
    wait_until(lambda: stack.call(refreshed["access_token"])[0] == 401, timeout=5)
    assert stack.reason(refreshed["access_token"]) == (401, "token_revoked")
    assert stack.reason(access) == (401, "token_revoked")

    # A new consent, then the client revokes its access token: 401 next, inactive when asked.
    second = tokens(env, client)
    fresh = str(second["access_token"])
    assert stack.call(fresh)[0] == 200
    client.revoke_token(env.url("/oauth/revoke"), token=fresh, token_type_hint="access_token")
    wait_until(lambda: stack.call(fresh)[0] == 401, timeout=5)
    assert stack.reason(fresh) == (401, "token_revoked")
    info = client.introspect_token(env.url("/oauth/introspect"), token=fresh)
    assert info.json() == {"active": False}


def test_admin_revoking_a_session_denies_its_tokens(stack: OAuthStack) -> None:
    from sidecar._gen.statuspulse.auth.v1 import oauth_pb2 as pb
    from tests.conftest import bearer

    env = stack.env
    client_id, secret = env.register()
    env.member()
    access = str(tokens(env, env.client(client_id, secret, scope="checks:read"))["access_token"])
    assert stack.call(access)[0] == 200
    stub = env.stub()
    (session,) = stub.ListOAuthAppSessions(
        pb.ListOAuthAppSessionsRequest(client_id=client_id), metadata=bearer(env.operator_key)
    ).sessions
    stub.RevokeOAuthAppSession(
        pb.RevokeOAuthAppSessionRequest(grant_id=session.grant_id),
        metadata=bearer(env.operator_key),
    )
    wait_until(lambda: stack.call(access)[0] == 401, timeout=5)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_forged_and_foreign_tokens_are_refused(stack: OAuthStack) -> None:
    env = stack.env
    client_id, secret = env.register()
    env.member()
    access = str(tokens(env, env.client(client_id, secret, scope="checks:read"))["access_token"])
    header = jwt.get_unverified_header(access)
    claims = jwt.decode(access, options={"verify_signature": False})
    assert env.plane.oauth is not None
    # The signing key as a thief who got it would hold it (the store keeps it only encrypted).
    with env.plane.store.read() as uow:
        _, private = env.plane.oauth.keys.signer(uow)
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    def signed(key: Any = private, **changes: Any) -> str:
        return jwt.encode({**claims, **changes}, key, algorithm="RS256", headers=header)

    none_header = _b64(json.dumps({**header, "alg": "none"}).encode())
    unsigned = f"{none_header}.{_b64(json.dumps(claims).encode())}.x"
    hs_header = _b64(json.dumps({**header, "alg": "HS256"}).encode())
    hs_body = _b64(json.dumps(claims).encode())
    mac = hmac.new(public_pem, f"{hs_header}.{hs_body}".encode(), hashlib.sha256).digest()
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cases = {
        "alg_not_allowed": [unsigned, f"{hs_header}.{hs_body}.{_b64(mac)}"],
        "wrong_issuer": [signed(iss="https://evil.example")],
        "wrong_audience": [signed(aud="another-api")],
        "unknown_key": [
            jwt.encode(claims, stranger, algorithm="RS256", headers={**header, "kid": "nope"})
        ],
        "bad_signature": [signed(key=stranger)],
        "wrong_type": [
            jwt.encode(claims, private, algorithm="RS256", headers={"kid": header["kid"]})
        ],
        # Even with the real key: no century-long tokens, no operator-wide ones.
        "lifetime_too_long": [signed(exp=claims["iat"] + 100 * 365 * 86400)],
        "invalid_workspace": [signed(workspace="*"), signed(workspace="Acme/../x")],
    }
    for reason, forged in cases.items():
        for token in forged:
            assert stack.reason(token) == (401, reason)
    # The genuine token still works; once expired (sidecar clock) it is refused.
    assert stack.call(access)[0] == 200
    env.clock.advance(3600 + 31)
    assert stack.reason(access) == (401, "token_expired")


def test_a_sessions_last_use_counts_verified_and_cached_token_checks(stack: OAuthStack) -> None:
    """Usage per OAuth grant end to end: the first check of an access token is verified and
    counted by the Python observer, its repeats are decided and counted in C (one usage store);
    the control plane's count for the grant (the token's ``sid``) is every allowed check."""
    env = stack.env
    client_id, secret = env.register(scopes=["checks:read"])
    env.member()
    access = str(tokens(env, env.client(client_id, secret, scope="checks:read"))["access_token"])
    grant = jwt.decode(access, options={"verify_signature": False})["sid"]
    for _ in range(3):
        assert stack.call(access)[0] == 200
    usage = env.plane.usage
    wait_until(lambda: sum(uses for _, uses in usage.of(grant).daily) == 3)
    assert usage.of(grant).last_used_at == int(env.clock.now())
