"""The OAuth flow against a real ControlPlane (admin gRPC + uvicorn on 127.0.0.1:0), driven by
authlib's OAuth2Session with PKCE S256, and the sign-in and consent forms submitted with
requests like a browser would. Time is a FakeClock shared with the server."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import grpc
import jwt
import pytest
import requests
from authlib.common.security import generate_token
from authlib.integrations.requests_client import OAuth2Session
from authlib.oauth2.rfc7636 import create_s256_code_challenge

from sidecar._gen.statuspulse.auth.v1 import oauth_pb2 as pb
from sidecar._gen.statuspulse.auth.v1 import oauth_pb2_grpc as pb_grpc
from sidecar.authz.access_tokens import verify_access_token
from sidecar.config import load_settings
from sidecar.controlplane import ControlPlane
from sidecar.core.changes import oauth_snapshot
from sidecar.core.clock import FakeClock
from sidecar.core.models import Principal, RequestContext
from tests.conftest import LoopThread, bearer
from tests.support.sync import TEST_SYNC_TOKEN

REDIRECT = "http://127.0.0.1:9/callback"
PASSWORD = "correct horse battery staple"


class _Forms(HTMLParser):
    """The inputs of the page's forms (hidden fields included)."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: list[tuple[str, str]] = []
        self.buttons: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "input" and a.get("type") == "hidden" and a.get("name"):
            self.fields.append((a["name"] or "", a.get("value") or ""))
        if tag == "button" and a.get("value"):
            self.buttons.append(a["value"] or "")


def form_fields(html: str) -> _Forms:
    parser = _Forms()
    parser.feed(html)
    return parser


@dataclass
class OAuthEnv:
    plane: ControlPlane
    clock: FakeClock
    admin: str
    operator_key: str
    issuer: str
    data_dir: Path
    secrets: list[str] = field(default_factory=list)

    def url(self, path: str) -> str:
        return self.issuer + path

    def stub(self) -> pb_grpc.OAuthAppServiceStub:
        return pb_grpc.OAuthAppServiceStub(grpc.insecure_channel(self.admin))

    def register(
        self,
        scopes: list[str] | None = None,
        *,
        confidential: bool = True,
        redirect_uris: list[str] | None = None,
        workspace: str = "acme",
    ) -> tuple[str, str]:
        resp = self.stub().RegisterOAuthApp(
            pb.RegisterOAuthAppRequest(
                workspace=workspace,
                name="Status dashboard",
                redirect_uris=redirect_uris or [REDIRECT],
                scopes=scopes or ["dashboard:read", "alerts:manage", "checks:read"],
                confidential=confidential,
            ),
            metadata=bearer(self.operator_key),
        )
        if resp.client_secret:
            self.secrets.append(resp.client_secret)
        return resp.app.client_id, resp.client_secret

    def member(self, email: str = "dev@acme.test", scopes: list[str] | None = None) -> str:
        stub = pb_grpc.UserServiceStub(grpc.insecure_channel(self.admin))
        resp = stub.CreateUser(
            pb.CreateUserRequest(
                workspace="acme", email=email, password=PASSWORD, scopes=scopes or []
            ),
            metadata=bearer(self.operator_key),
        )
        return str(resp.user.id)

    def client(
        self, client_id: str, secret: str = "", scope: str = "dashboard:read"
    ) -> OAuth2Session:
        return OAuth2Session(
            client_id,
            secret or None,
            scope=scope,
            redirect_uri=REDIRECT,
            code_challenge_method="S256",
            token_endpoint_auth_method="client_secret_basic" if secret else "none",
        )

    def audit_actions(self) -> list[str]:
        with sqlite3.connect(self.data_dir / "spauth.db") as conn:
            rows = conn.execute("SELECT action FROM audit_events ORDER BY seq").fetchall()
        return [r[0] for r in rows]

    def changes(self, kind: str) -> list[str]:
        with sqlite3.connect(self.data_dir / "spauth.db") as conn:
            rows = conn.execute(
                "SELECT payload FROM changes WHERE kind = ? ORDER BY revision", (kind,)
            ).fetchall()
        return [r[0] for r in rows]


@pytest.fixture
def oauth_env(tmp_path: Path, clock: FakeClock, loop_thread: LoopThread) -> Iterator[OAuthEnv]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    settings = load_settings(
        {
            "data_dir": str(data_dir),
            "admin_addr": "127.0.0.1:0",
            "http_addr": "127.0.0.1:0",
            "sweep_interval": "3600",
            "sync_token": TEST_SYNC_TOKEN,
        },
        environ={},
    )
    plane = ControlPlane(settings, clock=clock)
    minted = plane.bootstrap()
    assert minted is not None
    loop_thread.run(plane.start())
    assert plane.oauth is not None
    env = OAuthEnv(
        plane,
        clock,
        f"127.0.0.1:{plane.admin_port}",
        minted.secret,
        plane.oauth.config.issuer,
        data_dir,
    )
    yield env
    loop_thread.run(plane.aclose(grace=1))


def sign_in_and_consent(
    env: OAuthEnv,
    authorize_url: str,
    *,
    browser: requests.Session | None = None,
    email: str = "dev@acme.test",
    password: str = PASSWORD,
    decision: str = "approve",
) -> requests.Response:
    """What a member does in the browser; returns the final redirect to the client."""
    browser = browser or requests.Session()
    page = browser.get(authorize_url, allow_redirects=False)
    if page.status_code == 200 and 'name="password"' in page.text:
        fields = form_fields(page.text).fields
        signed_in = browser.post(
            env.url("/oauth/authorize"),
            data=[*fields, ("email", email), ("password", password)],
            allow_redirects=False,
        )
        assert signed_in.status_code == 303, signed_in.text
        page = browser.get(env.url(signed_in.headers["location"]), allow_redirects=False)
    assert page.status_code == 200, page.text
    assert "Approve" in page.text
    fields = form_fields(page.text).fields
    done = browser.post(
        env.url("/oauth/authorize"), data=[*fields, ("action", decision)], allow_redirects=False
    )
    assert done.status_code == 303, done.text
    return done


def query(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def authorize(env: OAuthEnv, client: OAuth2Session, **kwargs: object) -> tuple[str, str]:
    """The full front channel: returns (callback URL, code_verifier)."""
    verifier = generate_token(48)
    url, _ = client.create_authorization_url(env.url("/oauth/authorize"), code_verifier=verifier)
    done = sign_in_and_consent(env, url, **kwargs)  # type: ignore[arg-type]
    return done.headers["location"], verifier


def tokens(env: OAuthEnv, client: OAuth2Session) -> dict[str, object]:
    callback, verifier = authorize(env, client)
    return dict(
        client.fetch_token(
            env.url("/oauth/token"), authorization_response=callback, code_verifier=verifier
        )
    )


# -- the happy path ------------------------------------------------------------------------------


def test_full_flow_with_authlib(oauth_env: OAuthEnv) -> None:
    env = oauth_env
    client_id, secret = env.register()
    user_id = env.member()
    client = env.client(client_id, secret, scope="dashboard:read alerts:manage")
    verifier = generate_token(48)
    url, state = client.create_authorization_url(
        env.url("/oauth/authorize"), code_verifier=verifier
    )
    done = sign_in_and_consent(env, url)
    location = done.headers["location"]
    assert location.startswith(REDIRECT + "?")
    params = query(location)
    # RFC 6749 §4.1.2: state unchanged; RFC 9207: iss.
    assert params["state"] == state and params["iss"] == env.issuer
    assert params["code"].startswith("spac_")

    token = client.fetch_token(
        env.url("/oauth/token"), authorization_response=location, code_verifier=verifier
    )
    assert token["token_type"] == "Bearer" and token["expires_in"] == 3600
    assert token["refresh_token"].startswith("sprt_")
    assert token["scope"] == "dashboard:read alerts:manage"

    assert env.plane.oauth is not None
    keys = env.plane.oauth.keys.verification_keys()
    identity = verify_access_token(
        token["access_token"],
        keys,
        issuer=env.issuer,
        audience="statuspulse-api",
        now=env.clock.now(),
    )
    assert identity.subject == user_id and identity.client_id == client_id
    assert identity.workspace == "acme"
    assert identity.scopes == frozenset({"dashboard:read", "alerts:manage"})

    # Refresh rotates the refresh token and issues a new access token for the same grant.
    env.clock.advance(60)
    refreshed = client.refresh_token(env.url("/oauth/token"), refresh_token=token["refresh_token"])
    assert refreshed["refresh_token"] != token["refresh_token"]
    again = verify_access_token(
        refreshed["access_token"],
        keys,
        issuer=env.issuer,
        audience="statuspulse-api",
        now=env.clock.now(),
    )
    assert again.grant_id == identity.grant_id and again.jti != identity.jti

    # Introspection by the client itself.
    info = client.introspect_token(env.url("/oauth/introspect"), token=refreshed["access_token"])
    body = info.json()
    assert body["active"] is True and body["client_id"] == client_id
    assert body["sub"] == user_id and body["username"] == "dev@acme.test"
    assert info.headers["cache-control"] == "no-store"

    # Revoke the access token: introspection says inactive, the replica learns the jti.
    revoked = client.revoke_token(
        env.url("/oauth/revoke"), token=refreshed["access_token"], token_type_hint="access_token"
    )
    assert revoked.status_code == 200
    body = client.introspect_token(
        env.url("/oauth/introspect"), token=refreshed["access_token"]
    ).json()
    assert body == {"active": False}
    assert any(again.jti in p for p in env.changes("token.revoked"))

    actions = env.audit_actions()
    for action in (
        "app.registered",
        "signin.succeeded",
        "consent.granted",
        "token.issued",
        "token.refreshed",
        "token.revoked",
    ):
        assert action in actions


def test_public_client_flow_and_refresh_token_revocation(oauth_env: OAuthEnv) -> None:
    env = oauth_env
    client_id, secret = env.register(confidential=False)
    assert secret == ""
    env.member()
    client = env.client(client_id)
    token = tokens(env, client)
    assert isinstance(token["refresh_token"], str)
    # Revoking the refresh token revokes the grant (RFC 7009 §2.1) and tells the replicas.
    resp = client.revoke_token(
        env.url("/oauth/revoke"), token=token["refresh_token"], token_type_hint="refresh_token"
    )
    assert resp.status_code == 200
    assert len(env.changes("grant.revoked")) == 1
    with pytest.raises(Exception, match="invalid_grant"):
        client.refresh_token(env.url("/oauth/token"), refresh_token=token["refresh_token"])


# -- RFC checks and attacks ------------------------------------------------------------------------


def _token_post(
    env: OAuthEnv, data: dict[str, str], auth: tuple[str, str] | None = None
) -> requests.Response:
    return requests.post(env.url("/oauth/token"), data=data, auth=auth, timeout=10)


def _code(env: OAuthEnv, client_id: str, verifier: str, state: str = "xyz") -> str:
    challenge = create_s256_code_challenge(verifier)
    url = (
        env.url("/oauth/authorize")
        + f"?response_type=code&client_id={client_id}&redirect_uri={REDIRECT}"
        + f"&scope=dashboard:read&state={state}&code_challenge={challenge}"
        + "&code_challenge_method=S256"
    )
    return query(sign_in_and_consent(env, url).headers["location"])["code"]


def test_code_replay_is_refused_and_revokes_the_tokens(oauth_env: OAuthEnv) -> None:
    env = oauth_env
    client_id, secret = env.register()
    env.member()
    verifier = generate_token(48)
    code = _code(env, client_id, verifier)
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "code_verifier": verifier,
    }
    first = _token_post(env, data, (client_id, secret))
    assert first.status_code == 200 and first.headers["cache-control"] == "no-store"
    replay = _token_post(env, data, (client_id, secret))
    assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant"
    assert replay.headers["cache-control"] == "no-store"
    # §4.1.2: the tokens issued from the code are revoked.
    refresh = _token_post(
        env,
        {"grant_type": "refresh_token", "refresh_token": first.json()["refresh_token"]},
        (client_id, secret),
    )
    assert refresh.json()["error"] == "invalid_grant"
    assert len(env.changes("grant.revoked")) == 1


def test_expired_code_is_refused(oauth_env: OAuthEnv) -> None:
    env = oauth_env
    client_id, secret = env.register()
    env.member()
    verifier = generate_token(48)
    code = _code(env, client_id, verifier)
    env.clock.advance(601)
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "code_verifier": verifier,
    }
    assert _token_post(env, data, (client_id, secret)).json()["error"] == "invalid_grant"


def test_pkce_downgrade_and_wrong_verifier(oauth_env: OAuthEnv) -> None:
    env = oauth_env
    client_id, secret = env.register()
    env.member()
    base = (
        env.url("/oauth/authorize")
        + f"?response_type=code&client_id={client_id}&redirect_uri={REDIRECT}&state=s1"
    )
    # No challenge, or plain: invalid_request, redirected to the client with state.
    for extra in (
        "",
        "&code_challenge=" + "a" * 43 + "&code_challenge_method=plain",
        "&code_challenge=" + "a" * 43,
    ):
        resp = requests.get(base + extra, allow_redirects=False, timeout=10)
        assert resp.status_code == 302, resp.text
        params = query(resp.headers["location"])
        assert params["error"] == "invalid_request" and params["state"] == "s1"
        assert resp.headers["location"].startswith(REDIRECT)

    verifier = generate_token(48)
    code = _code(env, client_id, verifier)
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT}
    missing = _token_post(env, data, (client_id, secret))
    assert missing.json()["error"] == "invalid_request"
    wrong = _token_post(env, {**data, "code_verifier": generate_token(48)}, (client_id, secret))
    assert wrong.json()["error"] == "invalid_grant"
    # The code survives failed verification attempts; the right verifier still works.
    ok = _token_post(env, {**data, "code_verifier": verifier}, (client_id, secret))
    assert ok.status_code == 200


def test_redirect_uri_mismatch_is_never_redirected_to(oauth_env: OAuthEnv) -> None:
    env = oauth_env
    client_id, secret = env.register(redirect_uris=[REDIRECT, "https://app.example/cb"])
    env.member()
    challenge = create_s256_code_challenge(generate_token(48))
    for uri in (
        "https://evil.example/cb",
        REDIRECT + "/",
        REDIRECT + "?x=1",
        "http://127.0.0.1:9/CALLBACK",
        "",
    ):
        target = f"&redirect_uri={uri}" if uri else ""
        resp = requests.get(
            env.url("/oauth/authorize")
            + f"?response_type=code&client_id={client_id}{target}"
            + f"&code_challenge={challenge}&code_challenge_method=S256&state=s",
            allow_redirects=False,
            timeout=10,
        )
        assert resp.status_code == 400 and "location" not in resp.headers
        assert "Cannot continue" in resp.text
    unknown = requests.get(
        env.url("/oauth/authorize")
        + f"?response_type=code&client_id=app_nope&redirect_uri={REDIRECT}",
        allow_redirects=False,
        timeout=10,
    )
    assert unknown.status_code == 400 and "location" not in unknown.headers

    # At the token endpoint the redirect_uri must match the authorization request exactly.
    verifier = generate_token(48)
    code = _code(env, client_id, verifier)
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "code_verifier": verifier,
        "redirect_uri": "https://app.example/cb",
    }
    assert _token_post(env, data, (client_id, secret)).json()["error"] == "invalid_grant"


def test_wrong_client_credentials(oauth_env: OAuthEnv) -> None:
    env = oauth_env
    client_id, secret = env.register()
    other_id, other_secret = env.register()
    env.member()
    verifier = generate_token(48)
    code = _code(env, client_id, verifier)
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "code_verifier": verifier,
    }
    wrong_secret = _token_post(env, data, (client_id, other_secret))
    assert wrong_secret.status_code == 401
    assert wrong_secret.json()["error"] == "invalid_client"
    assert wrong_secret.headers["www-authenticate"].startswith("Basic")
    no_secret = _token_post(env, {**data, "client_id": client_id})
    assert no_secret.status_code == 401 and no_secret.json()["error"] == "invalid_client"
    # Another (authenticated) client cannot redeem this client's code.
    other = _token_post(env, data, (other_id, other_secret))
    assert other.status_code == 400 and other.json()["error"] == "invalid_grant"
    both = _token_post(env, {**data, "client_secret": secret}, (client_id, secret))
    assert both.json()["error"] == "invalid_request"
    ok = _token_post(env, {**data, "client_id": client_id, "client_secret": secret})
    assert ok.status_code == 200


def test_refresh_token_reuse_revokes_the_grant(oauth_env: OAuthEnv) -> None:
    env = oauth_env
    operator = RequestContext(Principal("key_op", "*", frozenset({"admin:full"})), "req_t")
    hook, _ = env.plane.webhooks.add(
        operator,
        workspace="acme",
        url="https://hooks.example.com/spauth",
        events=["oauth.refresh_token_reuse"],
    )
    client_id, secret = env.register()
    env.member()
    client = env.client(client_id, secret)
    first = tokens(env, client)
    rotated = client.refresh_token(env.url("/oauth/token"), refresh_token=first["refresh_token"])
    reuse = _token_post(
        env,
        {"grant_type": "refresh_token", "refresh_token": str(first["refresh_token"])},
        (client_id, secret),
    )
    assert reuse.json()["error"] == "invalid_grant"
    # RFC 9700 §4.14.2: the whole grant is gone, including the legitimately rotated token.
    after = _token_post(
        env,
        {"grant_type": "refresh_token", "refresh_token": rotated["refresh_token"]},
        (client_id, secret),
    )
    assert after.json()["error"] == "invalid_grant"
    assert "refresh.reuse_detected" in env.audit_actions()
    payloads = env.changes("grant.revoked")
    assert len(payloads) == 1 and '"expires_at"' in payloads[0]
    # The workspace's webhook got the event, queued in the transaction that revoked the grant.
    with env.plane.store.read() as uow:
        (queued,) = uow.webhooks.recent_deliveries(hook.id, 10)
    body = json.loads(queued.body)
    assert body["type"] == "oauth.refresh_token_reuse" and body["data"]["client_id"] == client_id


def test_scope_rules(oauth_env: OAuthEnv) -> None:
    env = oauth_env
    client_id, secret = env.register(scopes=["dashboard:read", "keys:manage"])
    env.member()  # default member scopes exclude keys:manage
    challenge = create_s256_code_challenge(generate_token(48))
    base = (
        env.url("/oauth/authorize")
        + f"?response_type=code&client_id={client_id}&redirect_uri={REDIRECT}&state=q"
        + f"&code_challenge={challenge}&code_challenge_method=S256"
    )
    beyond_app = requests.get(base + "&scope=metrics:write", allow_redirects=False, timeout=10)
    assert query(beyond_app.headers["location"])["error"] == "invalid_scope"
    unknown = requests.get(base + "&scope=root", allow_redirects=False, timeout=10)
    assert query(unknown.headers["location"])["error"] == "invalid_scope"
    # Within the app's scopes but beyond the member's: refused at approval.
    done = sign_in_and_consent(env, base + "&scope=keys:manage")
    params = query(done.headers["location"])
    assert params["error"] == "invalid_scope" and params["state"] == "q"
    # A refresh may narrow the scope, not widen it.
    client = env.client(client_id, secret, scope="dashboard:read")
    token = tokens(env, client)
    widen = _token_post(
        env,
        {
            "grant_type": "refresh_token",
            "refresh_token": str(token["refresh_token"]),
            "scope": "dashboard:read keys:manage",
        },
        (client_id, secret),
    )
    assert widen.json()["error"] == "invalid_scope"


def test_consent_denied_redirects_access_denied(oauth_env: OAuthEnv) -> None:
    env = oauth_env
    client_id, secret = env.register()
    env.member()
    client = env.client(client_id, secret)
    url, state = client.create_authorization_url(
        env.url("/oauth/authorize"), code_verifier=generate_token(48)
    )
    done = sign_in_and_consent(env, url, decision="deny")
    params = query(done.headers["location"])
    assert params == {
        "error": "access_denied",
        "error_description": params["error_description"],
        "state": state,
        "iss": env.issuer,
    }
    assert "consent.denied" in env.audit_actions()


def test_token_endpoint_errors_are_rfc6749_json(oauth_env: OAuthEnv) -> None:
    env = oauth_env
    client_id, secret = env.register()
    auth = (client_id, secret)
    cases = [
        ({"grant_type": "password", "username": "x"}, "unsupported_grant_type"),
        ({}, "invalid_request"),
        ({"grant_type": "authorization_code"}, "invalid_request"),
        ({"grant_type": "authorization_code", "code": "spac_nope"}, "invalid_grant"),
        ({"grant_type": "refresh_token", "refresh_token": "sprt_" + "A" * 38}, "invalid_grant"),
    ]
    for data, error in cases:
        resp = _token_post(env, data, auth)
        assert resp.status_code == 400, (data, resp.text)
        assert resp.headers["content-type"] == "application/json"
        assert resp.headers["cache-control"] == "no-store"
        assert resp.json()["error"] == error
        assert set(resp.json()) <= {"error", "error_description"}
    repeated = requests.post(
        env.url("/oauth/token"),
        data="grant_type=refresh_token&grant_type=refresh_token",
        headers={"content-type": "application/x-www-form-urlencoded"},
        auth=auth,
        timeout=10,
    )
    assert repeated.json()["error"] == "invalid_request"
    as_json = requests.post(
        env.url("/oauth/token"), json={"grant_type": "x"}, auth=auth, timeout=10
    )
    assert as_json.json()["error"] == "invalid_request"


def test_metadata_and_jwks(oauth_env: OAuthEnv) -> None:
    env = oauth_env
    meta = requests.get(env.url("/.well-known/oauth-authorization-server"), timeout=10).json()
    # RFC 8414 §3.3: the issuer is exactly the configured one.
    assert meta["issuer"] == env.issuer
    assert meta["token_endpoint"] == env.issuer + "/oauth/token"
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert meta["grant_types_supported"] == ["authorization_code", "refresh_token"]
    jwks = requests.get(meta["jwks_uri"], timeout=10).json()
    assert [k["alg"] for k in jwks["keys"]] == ["RS256"]
    assert all("d" not in k and "p" not in k for k in jwks["keys"])


def _kid(token: object) -> str:
    return str(jwt.get_unverified_header(str(token))["kid"])


def test_signing_key_rotation_publishes_ahead_and_keeps_the_previous_key(
    oauth_env: OAuthEnv,
) -> None:
    env = oauth_env
    assert env.plane.oauth is not None
    keys = env.plane.oauth.keys
    first = keys.ensure_current()
    client_id, secret = env.register()
    env.member()
    client = env.client(client_id, secret)
    old_token = tokens(env, client)
    second, _ = keys.rotate()
    # Ahead-of-time rollover: published (JWKS and replicas) before it signs anything.
    assert [k["kid"] for k in keys.jwks()["keys"]] == [second.kid, first.kid]
    assert any(second.kid in p for p in env.changes("signing_key.upserted"))
    assert _kid(tokens(env, client)["access_token"]) == first.kid
    assert keys.rotate()[0].kid == second.kid  # one pending key at a time
    env.clock.advance(keys.lead_time)
    assert keys.sweep() == 1  # the first key is superseded: its private part destroyed
    assert _kid(tokens(env, client)["access_token"]) == second.kid
    third, _ = keys.rotate()
    env.clock.advance(keys.lead_time)
    keys.sweep()
    published = [k["kid"] for k in keys.jwks()["keys"]]
    assert published == [third.kid, second.kid, first.kid]
    # Tokens signed by the first key may still be alive: it stays until they expire.
    assert keys.sweep() == 0
    env.clock.advance(3600 + 121)
    assert keys.sweep() == 1
    assert [k["kid"] for k in keys.jwks()["keys"]] == [third.kid, second.kid]
    assert any(first.kid in p for p in env.changes("signing_key.retired"))
    with env.plane.store.read() as uow:
        snapshot = oauth_snapshot(uow, env.clock.now())
        private_parts = {k.kid: k.private_pem for k in uow.oauth.signing_keys.all()}
    assert {c.subject for c in snapshot if c.kind == "signing_key.upserted"} == {
        third.kid,
        second.kid,
    }
    assert private_parts[first.kid] == b"" and private_parts[second.kid] == b""
    assert private_parts[third.kid].startswith(b"spk1.")
    assert isinstance(old_token["access_token"], str)


def test_snapshot_lists_revocations_until_their_tokens_expire(oauth_env: OAuthEnv) -> None:
    env = oauth_env
    client_id, secret = env.register()
    env.member()
    client = env.client(client_id, secret)
    token = tokens(env, client)
    client.revoke_token(env.url("/oauth/revoke"), token=str(token["refresh_token"]))
    with env.plane.store.read() as uow:
        kinds = [c.kind for c in oauth_snapshot(uow, env.clock.now())]
    assert kinds.count("grant.revoked") == 1
    env.clock.advance(3601)
    with env.plane.store.read() as uow:
        kinds = [c.kind for c in oauth_snapshot(uow, env.clock.now())]
    assert "grant.revoked" not in kinds


# -- the browser side ----------------------------------------------------------------------------


def test_session_cookie_flags_and_page_headers(oauth_env: OAuthEnv) -> None:
    env = oauth_env
    client_id, _ = env.register()
    challenge = create_s256_code_challenge(generate_token(48))
    resp = requests.get(
        env.url("/oauth/authorize")
        + f"?response_type=code&client_id={client_id}&redirect_uri={REDIRECT}"
        + f"&code_challenge={challenge}&code_challenge_method=S256",
        timeout=10,
    )
    assert resp.status_code == 200
    cookie = resp.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and "secure" not in cookie
    assert resp.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in resp.headers["content-security-policy"]
    assert resp.headers["cache-control"] == "no-store"
    fields = dict(form_fields(resp.text).fields)
    assert len(fields["csrf_token"]) == 64


def test_forms_without_a_valid_csrf_token_are_refused(oauth_env: OAuthEnv) -> None:
    env = oauth_env
    client_id, _ = env.register()
    env.member()
    challenge = create_s256_code_challenge(generate_token(48))
    browser = requests.Session()
    page = browser.get(
        env.url("/oauth/authorize")
        + f"?response_type=code&client_id={client_id}&redirect_uri={REDIRECT}"
        + f"&code_challenge={challenge}&code_challenge_method=S256",
        timeout=10,
    )
    fields = [(k, v) for k, v in form_fields(page.text).fields if k != "csrf_token"]
    creds = [("email", "dev@acme.test"), ("password", PASSWORD)]
    forged = browser.post(
        env.url("/oauth/authorize"),
        data=[*fields, ("csrf_token", "0" * 64), *creds],
        allow_redirects=False,
    )
    assert forged.status_code == 403 and "location" not in forged.headers
    # A token from another browser's session does not fit this one.
    other = requests.Session()
    other_page = other.get(page.url, timeout=10)
    their = dict(form_fields(other_page.text).fields)["csrf_token"]
    crossed = browser.post(
        env.url("/oauth/authorize"),
        data=[*fields, ("csrf_token", their), *creds],
        allow_redirects=False,
    )
    assert crossed.status_code == 403


def test_sign_in_is_throttled_per_account(oauth_env: OAuthEnv) -> None:
    env = oauth_env
    client_id, _ = env.register()
    env.member()
    challenge = create_s256_code_challenge(generate_token(48))
    url = (
        env.url("/oauth/authorize")
        + f"?response_type=code&client_id={client_id}&redirect_uri={REDIRECT}"
        + f"&code_challenge={challenge}&code_challenge_method=S256"
    )
    browser = requests.Session()
    fields = form_fields(browser.get(url, timeout=10).text).fields

    def attempt(password: str) -> requests.Response:
        return browser.post(
            env.url("/oauth/authorize"),
            data=[*fields, ("email", "dev@acme.test"), ("password", password)],
            allow_redirects=False,
        )

    for _ in range(5):
        assert attempt("wrong password!!").status_code == 401
    blocked = attempt(PASSWORD)
    assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) > 0
    assert env.audit_actions().count("signin.failed") == 5
    env.clock.advance(901)
    assert attempt(PASSWORD).status_code == 303


def test_unknown_email_and_wrong_password_look_the_same(oauth_env: OAuthEnv) -> None:
    env = oauth_env
    client_id, _ = env.register()
    env.member()
    challenge = create_s256_code_challenge(generate_token(48))
    url = (
        env.url("/oauth/authorize")
        + f"?response_type=code&client_id={client_id}&redirect_uri={REDIRECT}"
        + f"&code_challenge={challenge}&code_challenge_method=S256"
    )
    browser = requests.Session()
    fields = form_fields(browser.get(url, timeout=10).text).fields
    texts = []
    for email, password in (("nobody@acme.test", PASSWORD), ("dev@acme.test", "not the password")):
        resp = browser.post(
            env.url("/oauth/authorize"),
            data=[*fields, ("email", email), ("password", password)],
            allow_redirects=False,
        )
        assert resp.status_code == 401
        texts.append(resp.text.replace(email, ""))
    assert texts[0] == texts[1]


def test_introspection_needs_authentication(oauth_env: OAuthEnv) -> None:
    env = oauth_env
    client_id, secret = env.register()
    public_id, _ = env.register(confidential=False)
    env.member()
    token = tokens(env, env.client(client_id, secret))
    url = env.url("/oauth/introspect")
    data = {"token": str(token["access_token"])}
    anonymous = requests.post(url, data=data, timeout=10)
    assert anonymous.status_code == 401
    public = requests.post(url, data={**data, "client_id": public_id}, timeout=10)
    assert public.status_code == 401
    bad_key = requests.post(
        url, data=data, headers={"authorization": "Bearer spk_nope"}, timeout=10
    )
    assert bad_key.status_code == 401
    admin = requests.post(
        url, data=data, headers={"authorization": f"Bearer {env.operator_key}"}, timeout=10
    )
    assert admin.json()["active"] is True
    # Another client may not look at this client's token.
    other_id, other_secret = env.register()
    other = requests.post(url, data=data, auth=(other_id, other_secret), timeout=10)
    assert other.json() == {"active": False}
    garbage = requests.post(url, data={"token": "nope"}, auth=(client_id, secret), timeout=10)
    assert garbage.json() == {"active": False}


def test_revocation_rules(oauth_env: OAuthEnv) -> None:
    env = oauth_env
    client_id, secret = env.register()
    other_id, other_secret = env.register()
    env.member()
    token = tokens(env, env.client(client_id, secret))
    url = env.url("/oauth/revoke")
    unknown = requests.post(url, data={"token": "whatever"}, auth=(client_id, secret), timeout=10)
    assert unknown.status_code == 200
    hint = requests.post(
        url,
        data={"token": "x", "token_type_hint": "id_token"},
        auth=(client_id, secret),
        timeout=10,
    )
    assert hint.json()["error"] == "unsupported_token_type"
    theirs = requests.post(
        url, data={"token": str(token["refresh_token"])}, auth=(other_id, other_secret), timeout=10
    )
    assert theirs.json()["error"] == "unauthorized_client"
    unauthenticated = requests.post(url, data={"token": str(token["refresh_token"])}, timeout=10)
    assert unauthenticated.status_code == 401


def test_revocation_store_failure_is_temporarily_unavailable(oauth_env: OAuthEnv) -> None:
    env = oauth_env
    client_id, secret = env.register()
    env.member()
    token = tokens(env, env.client(client_id, secret))
    # Hold the database's write lock from another connection: the revocation cannot commit.
    blocker = sqlite3.connect(env.data_dir / "spauth.db", timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        resp = requests.post(
            env.url("/oauth/revoke"),
            data={"token": str(token["refresh_token"])},
            auth=(client_id, secret),
            timeout=30,
        )
    finally:
        blocker.rollback()
        blocker.close()
    assert resp.status_code == 503 and resp.json() == {"error": "temporarily_unavailable"}
    assert env.changes("grant.revoked") == []


def test_app_deletion_revokes_its_sessions(oauth_env: OAuthEnv) -> None:
    env = oauth_env
    client_id, secret = env.register()
    env.member()
    token = tokens(env, env.client(client_id, secret))
    stub = env.stub()
    sessions = stub.ListOAuthAppSessions(
        pb.ListOAuthAppSessionsRequest(client_id=client_id), metadata=bearer(env.operator_key)
    ).sessions
    assert [s.email for s in sessions] == ["dev@acme.test"]
    stub.DeleteOAuthApp(
        pb.DeleteOAuthAppRequest(client_id=client_id), metadata=bearer(env.operator_key)
    )
    refresh = _token_post(
        env,
        {"grant_type": "refresh_token", "refresh_token": str(token["refresh_token"])},
        (client_id, secret),
    )
    assert refresh.status_code == 401
    assert len(env.changes("grant.revoked")) == 1
    assert "app.deleted" in env.audit_actions()
