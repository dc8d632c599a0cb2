"""Issue 14 in process, with an injected clock: sign-in throttling per account and source (behind
a trusted proxy), what a failed sign-in records, redirect URIs as browsers parse them, the
absolute grant lifetime, grace deadlines enforced by the replica, least privilege on revoke, the
verifier's lifetime and workspace rules, key-encryption keys, and operator key expiry."""

from __future__ import annotations

import ipaddress
import json
import logging
import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import requests
from authlib.oauth2.rfc7636 import create_s256_code_challenge

from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2 as keys_pb
from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2_grpc as keys_grpc
from sidecar._gen.statuspulse.auth.v1 import oauth_pb2 as pb
from sidecar._gen.statuspulse.auth.v1 import oauth_pb2_grpc as pb_grpc
from sidecar.authz.access_tokens import Reason, TokenRejected, verification_key, verify_access_token
from sidecar.authz.decision import Reason as Decided
from sidecar.authz.engine import Engine
from sidecar.authz.policy import parse_policy
from sidecar.authz.replica import Replica
from sidecar.config import load_settings
from sidecar.controlplane import ControlPlane
from sidecar.core import kek
from sidecar.core.apikeys import ApiKeyService, key_entries, key_rows
from sidecar.core.apps import uri_problem
from sidecar.core.clock import FakeClock
from sidecar.core.errors import FailedPrecondition, PermissionDenied
from sidecar.core.kek import KekError, KeyEncryption
from sidecar.core.models import RequestContext
from sidecar.core.storage import Store
from sidecar.http.client_address import resolve
from sidecar.oauth import rfc9068
from sidecar.oauth.signing import SigningKeys
from tests.conftest import LoopThread, bearer
from tests.support.signing import key_pair
from tests.test_oauth_flow import PASSWORD, REDIRECT, OAuthEnv, form_fields, tokens
from tests.test_oauth_flow import oauth_env as oauth_env

ATTACKER = "203.0.113.9"
MEMBER = "198.51.100.7"


@pytest.fixture
def proxied(tmp_path: Path, clock: FakeClock, loop_thread: LoopThread) -> Iterator[OAuthEnv]:
    """A control plane behind a trusted proxy on loopback (X-Forwarded-For names the client)."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    settings = load_settings(
        {
            "data_dir": str(data_dir),
            "admin_addr": "127.0.0.1:0",
            "http_addr": "127.0.0.1:0",
            "sweep_interval": "3600",
            "trusted_proxies": "127.0.0.1/32, ::1",
        },
        environ={},
    )
    plane = ControlPlane(settings, clock=clock)
    minted = plane.bootstrap()
    assert minted is not None
    loop_thread.run(plane.start())
    assert plane.oauth is not None
    yield OAuthEnv(
        plane,
        clock,
        f"127.0.0.1:{plane.admin_port}",
        minted.secret,
        plane.oauth.config.issuer,
        data_dir,
    )
    loop_thread.run(plane.aclose(grace=1))


def _sign_in_form(
    env: OAuthEnv, client_id: str = ""
) -> tuple[requests.Session, list[tuple[str, str]]]:
    """A fresh browser at the sign-in page (its own session cookie and CSRF token)."""
    client_id = client_id or env.register()[0]
    challenge = create_s256_code_challenge("v" * 48)
    url = (
        env.url("/oauth/authorize")
        + f"?response_type=code&client_id={client_id}&redirect_uri={REDIRECT}"
        + f"&code_challenge={challenge}&code_challenge_method=S256"
    )
    browser = requests.Session()
    return browser, form_fields(browser.get(url, timeout=10).text).fields


def _attempt(
    env: OAuthEnv,
    browser: requests.Session,
    fields: list[tuple[str, str]],
    source: str,
    email: str = "dev@acme.test",
    password: str = PASSWORD,
) -> requests.Response:
    return browser.post(
        env.url("/oauth/authorize"),
        data=[*fields, ("email", email), ("password", password)],
        headers={"x-forwarded-for": f"10.9.9.9, {source}"},
        allow_redirects=False,
        timeout=10,
    )


def test_a_stranger_guessing_cannot_lock_the_member_out(proxied: OAuthEnv) -> None:
    env = proxied
    env.member()
    client_id, _ = env.register()
    browser, fields = _sign_in_form(env, client_id)
    for _ in range(5):
        guess = _attempt(env, browser, fields, ATTACKER, password="guess guess guess")
        assert guess.status_code == 401
    blocked = _attempt(env, browser, fields, ATTACKER, password="guess guess guess")
    assert blocked.status_code == 429 and blocked.headers["retry-after"] == "1"
    # The member, from their own address, signs in at once with the right password.
    member_browser, member_fields = _sign_in_form(env, client_id)
    assert _attempt(env, member_browser, member_fields, MEMBER).status_code == 303
    # The guesser's backoff is short, and doubles.
    env.clock.advance(1)
    assert _attempt(env, browser, fields, ATTACKER, password="guess again!!").status_code == 401
    again = _attempt(env, browser, fields, ATTACKER, password="guess again!!")
    assert again.status_code == 429 and again.headers["retry-after"] == "2"
    with sqlite3.connect(env.data_dir / "spauth.db") as conn:
        sources = {
            json.loads(m)["source"]
            for (m,) in conn.execute(
                "SELECT metadata FROM audit_events WHERE action LIKE 'signin.%'"
            )
        }
    # The client's address from the trusted proxy's header, never the forged left-most hop.
    assert sources == {ATTACKER, MEMBER}


def test_a_failed_sign_in_never_records_what_was_typed(proxied: OAuthEnv) -> None:
    env = proxied
    env.member()
    browser, fields = _sign_in_form(env)
    typed = "Tr0ub4dor&3-my-password"  # typed into the e-mail box by mistake
    assert _attempt(env, browser, fields, MEMBER, email=typed).status_code == 401
    assert _attempt(env, browser, fields, MEMBER, email="Nobody@Acme.test").status_code == 401
    with sqlite3.connect(env.data_dir / "spauth.db") as conn:
        rows = conn.execute(
            "SELECT reason, metadata FROM audit_events WHERE action = 'signin.failed' ORDER BY seq"
        ).fetchall()
        dump = "\n".join(line for line in conn.iterdump())
    assert [r for r, _ in rows] == ["malformed e-mail address", "unknown e-mail address"]
    assert "email" not in json.loads(rows[0][1])
    assert json.loads(rows[1][1])["email"] == "nobody@acme.test"
    assert typed not in dump


def test_without_a_trusted_proxy_forwarded_for_is_ignored(oauth_env: OAuthEnv) -> None:
    env = oauth_env
    env.member()
    browser, fields = _sign_in_form(env)
    for _ in range(5):
        _attempt(env, browser, fields, ATTACKER, password="guess guess guess")
    # Every request came from the same peer: a forged header does not buy a fresh source.
    assert _attempt(env, browser, fields, MEMBER).status_code == 429


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("http://evil.example\\@127.0.0.1/cb", "backslash"),
        ("https://evil.example\\.good.example/cb", "backslash"),
        ("http://evil.example@127.0.0.1/cb", "userinfo"),
        ("https://user:pw@app.example/cb", "userinfo"),
        ("https://app.example/c\tb", "control"),
        ("https://app%2eexample/cb", "malformed host"),
        ("https://app.example:/cb", "malformed port"),
        ("http://127.0.0.1.evil.example/cb", "loopback"),
        ("https:/app.example/cb", "scheme://"),
        ("https://äpp.example/cb", "ASCII"),
    ],
)
def test_redirect_uris_a_browser_would_read_differently_are_refused(uri: str, problem: str) -> None:
    assert problem in uri_problem(uri)


@pytest.mark.parametrize(
    "uri",
    ["http://127.0.0.1:8765/cb", "http://[::1]/cb", "https://app.example/cb?x=1", "com.app:/cb"],
)
def test_good_redirect_uris_pass(uri: str) -> None:
    assert uri_problem(uri) == ""


def test_bad_redirect_uris_are_refused_at_registration_and_at_authorize(
    oauth_env: OAuthEnv,
) -> None:
    env = oauth_env
    with pytest.raises(grpc.RpcError) as info:
        env.stub().RegisterOAuthApp(
            pb.RegisterOAuthAppRequest(
                workspace="acme",
                name="x",
                redirect_uris=["http://evil.example\\@127.0.0.1/cb"],
                scopes=["dashboard:read"],
            ),
            metadata=bearer(env.operator_key),
        )
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "backslash" in str(info.value.details())
    # A URI registered before the check existed is never redirected to.
    client_id, _ = env.register()
    bad = "http://evil.example\\@127.0.0.1/cb"
    with env.plane.store.transaction() as uow:
        app = uow.oauth.apps.get(client_id)
        assert app is not None
        uow.oauth.apps.update(replace(app, redirect_uris=(bad,)))
    challenge = create_s256_code_challenge("v" * 48)
    for extra in ("", f"&redirect_uri={bad}"):
        page = requests.get(
            env.url("/oauth/authorize")
            + f"?response_type=code&client_id={client_id}&code_challenge={challenge}"
            + f"&code_challenge_method=S256{extra}",
            allow_redirects=False,
            timeout=10,
        )
        assert page.status_code == 400 and "location" not in page.headers


def test_a_grant_ends_at_its_absolute_lifetime(oauth_env: OAuthEnv) -> None:
    env = oauth_env
    client_id, secret = env.register()
    env.member()
    client = env.client(client_id, secret)
    token = tokens(env, client)
    refresh = str(token["refresh_token"])
    lifetime = env.plane.settings.oauth_grant_lifetime
    # Rotating every 29 days keeps the refresh token fresh, but not the grant.
    for _ in range(3):
        env.clock.advance(29 * 86400)
        refresh = client.refresh_token(env.url("/oauth/token"), refresh_token=refresh)[
            "refresh_token"
        ]
    with env.plane.store.read() as uow:
        from sidecar.core import credentials

        stored = uow.oauth.refresh_tokens.get(credentials.digest(refresh))
    assert stored is not None and stored.expires_at - stored.created_at < 30 * 86400
    env.clock.advance(lifetime - 3 * 29 * 86400)
    with pytest.raises(Exception, match="invalid_grant"):
        client.refresh_token(env.url("/oauth/token"), refresh_token=refresh)


# -- API keys: grace deadlines in the replica, least privilege on revoke, operator keys --------


def test_the_replica_enforces_a_grace_deadline_without_the_control_plane(
    store: Store, clock: FakeClock
) -> None:
    svc = ApiKeyService(store, clock)
    minted = svc.bootstrap_operator_key()
    assert minted is not None
    op = RequestContext(svc.authenticate(minted.secret), "req")
    old = svc.create(op, workspace="acme", name="ci", scopes=["checks:read"])
    svc.replace(op, old.key.id, grace=600)
    replica = Replica()
    with store.read() as uow:
        replica.load_snapshot(uow.changes.head(), key_entries(key_rows(uow, int(clock.now()))))
        changes = uow.changes.since(0, 100)
    assert any(c.payload.get("grace_deadline") for c in changes if c.subject == old.key.id)
    follower = Replica()  # a replica following the log learns the same deadline
    for change in changes:
        follower.apply(change)
    (followed,) = [c for c in follower.by_digest.values() if c.id == old.key.id]
    assert followed.expires_at == clock.now() + 600
    replica.last_contact = clock.now()
    engine = Engine(replica, parse_policy(_POLICY), clock)

    def check() -> Decided:
        return engine.authorize(old.secret, ["checks:read"]).reason

    assert check() is Decided.OK
    clock.advance(601)  # no sweep ran: the control plane may be down
    assert check() is Decided.EXPIRED_CREDENTIAL


_POLICY = '[[routes]]\nname = "c"\npath = "/**"\nscopes = ["checks:read"]\n'


def test_revoking_needs_every_scope_of_the_key(store: Store, clock: FakeClock) -> None:
    svc = ApiKeyService(store, clock)
    minted = svc.bootstrap_operator_key()
    assert minted is not None
    op = RequestContext(svc.authenticate(minted.secret), "req")
    admin = svc.create(op, workspace="acme", name="admin", scopes=["admin:full"])
    manager = svc.create(op, workspace="acme", name="mgr", scopes=["keys:manage", "checks:read"])
    reader = svc.create(op, workspace="acme", name="ci", scopes=["checks:read"])
    as_manager = RequestContext(svc.authenticate(manager.secret), "req")
    with pytest.raises(PermissionDenied, match="admin:full"):
        svc.revoke(as_manager, admin.key.id)
    assert svc.revoke(as_manager, reader.key.id).revoked_at is not None


def test_operator_keys_two_at_most_and_the_last_needs_force(store: Store, clock: FakeClock) -> None:
    svc = ApiKeyService(store, clock)
    minted = svc.bootstrap_operator_key()
    assert minted is not None
    op = RequestContext(svc.authenticate(minted.secret), "req")
    with pytest.raises(FailedPrecondition, match="last usable operator key"):
        svc.revoke(op, minted.key.id)
    second = svc.create(op, workspace="*", name="next", scopes=["admin:full"])
    with pytest.raises(FailedPrecondition, match="revoke one first"):
        svc.replace(op, second.key.id)
    svc.revoke(op, minted.key.id)  # another operator key remains: no force needed
    assert svc.operator_expiry() == second.key.expires_at
    svc.revoke(op, second.key.id, force=True)
    assert svc.operator_expiry() == 0
    recovered = svc.break_glass_operator_key("alice")
    assert svc.authenticate(recovered.secret).is_operator


def test_an_expiring_operator_key_is_warned_about(
    proxied: OAuthEnv, caplog: pytest.LogCaptureFixture
) -> None:
    env = proxied
    expiry = env.plane.check_operator_keys()
    assert expiry > env.clock.now() + 80 * 86400
    metrics = env.plane.metrics.registry.get_sample_value
    assert metrics("spauth_operator_key_expiry_timestamp_seconds") == expiry
    assert "operator key expiring" not in caplog.text
    env.clock.advance(expiry - env.clock.now() - 86400)
    with caplog.at_level(logging.WARNING, logger="sidecar.controlplane"):
        env.plane.check_operator_keys()
    assert "operator key expiring" in caplog.text


# -- the verifier: lifetime and workspace ---------------------------------------------------------

NOW = 1_800_000_000


def _verify(ttl: int, workspace: str) -> str:
    key, private = key_pair(NOW)
    token = rfc9068.issue(
        (key.kid, private),
        issuer="https://auth.test",
        audience="api",
        subject="usr_1",
        client_id="app_1",
        scopes=["checks:read"],
        workspace=workspace,
        grant_id="grt_1",
        now=NOW,
        ttl=ttl,
    ).token
    keys = {key.kid: verification_key(key.kid, key.alg, key.public_jwk)}
    try:
        verify_access_token(
            token, keys, issuer="https://auth.test", audience="api", now=NOW, max_lifetime=3600
        )
    except TokenRejected as exc:
        return exc.reason.value
    return "ok"


def test_the_verifier_refuses_long_lived_and_non_workspace_tokens() -> None:
    assert _verify(3600, "acme") == "ok"
    assert _verify(3600 + 30, "acme") == "ok"  # within the clock-skew leeway
    assert _verify(100 * 365 * 86400, "acme") == Reason.LIFETIME_TOO_LONG.value
    assert _verify(3600, "*") == Reason.INVALID_WORKSPACE.value
    assert _verify(3600, "Acme/../x") == Reason.INVALID_WORKSPACE.value


# -- key-encryption keys ---------------------------------------------------------------------------


def test_keks_rewrap_plaintext_keys_and_rotate(store: Store, clock: FakeClock) -> None:
    old_kek, new_kek = kek.generate(), kek.generate()

    def keys(setting: str) -> SigningKeys:
        encryption = KeyEncryption(kek.parse(setting, "test"))
        return SigningKeys(
            store, clock, rotation_interval=86400, access_token_ttl=3600, encryption=encryption
        )

    first = keys(old_kek)
    current = first.ensure_current()
    # A key stored in clear by an older version is encrypted at the next start.
    from cryptography.hazmat.primitives import serialization

    with store.read() as uow:
        signer = first.signer(uow)[1]
    pem = signer.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with store.transaction() as uow:
        uow.oauth.signing_keys.update(replace(current, private_pem=pem))
    assert first.rewrap() == 1
    # KEK rotation: the new KEK first, the old one still listed; start-up re-encrypts.
    rotated = keys(f"{new_kek},{old_kek}")
    assert rotated.rewrap() == 1
    with store.read() as uow:
        stored = uow.oauth.signing_keys.all()[0].private_pem
    assert stored.startswith(b"spk1.") and b"PRIVATE" not in stored
    with store.read() as uow:
        assert keys(new_kek).signer(uow)[0] == current.kid  # the old KEK can go now
        with pytest.raises(KekError, match="not configured"):
            keys(old_kek).signer(uow)
    tampered = stored[:-6] + (b"AAAAAA" if not stored.endswith(b"AAAAAA") else b"BBBBBB")
    with pytest.raises(KekError, match="does not decrypt"):
        KeyEncryption(kek.parse(new_kek, "t")).decrypt(tampered, current.kid)
    with pytest.raises(KekError, match="32 bytes"):
        kek.parse("c2hvcnQ", "key_encryption_key")


def test_a_shared_store_needs_an_explicit_kek() -> None:
    from sidecar.config import ConfigError

    with pytest.raises(ConfigError, match="key_encryption_key"):
        load_settings({"database_url": "postgresql://db/spauth"}, environ={})
    settings = load_settings(
        {"database_url": "postgresql://db/spauth"},
        environ={"SPAUTH_KEY_ENCRYPTION_KEY": kek.generate()},
    )
    assert settings.key_encryption_key


# -- the client's address behind trusted proxies ---------------------------------------------------

PROXIES = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        ("203.0.113.9", ["198.51.100.7"], "203.0.113.9"),  # not from a proxy: header ignored
        ("10.0.0.2", ["198.51.100.7"], "198.51.100.7"),
        ("10.0.0.2", ["1.2.3.4, 198.51.100.7, 10.0.0.5"], "198.51.100.7"),  # right-most untrusted
        ("10.0.0.2", ["1.2.3.4", "198.51.100.7"], "198.51.100.7"),  # repeated headers, in order
        ("10.0.0.2", ["198.51.100.7, not-an-address"], "10.0.0.2"),  # a forged hop: stop
        ("10.0.0.2", ["10.0.0.7"], "10.0.0.2"),  # only proxies: the peer
        ("10.0.0.2", [], "10.0.0.2"),
        ("::1", ["2001:db8::1"], "2001:db8::1"),
    ],
)
def test_client_address_is_the_right_most_untrusted_hop(
    peer: str, forwarded: list[str], client: str
) -> None:
    assert resolve(peer, forwarded, PROXIES) == client


def test_trusted_proxies_are_validated() -> None:
    from sidecar.config import ConfigError

    with pytest.raises(ConfigError, match="trusted_proxies: expected addresses or CIDR"):
        load_settings({"trusted_proxies": "10.0.0.0/33"}, environ={})


# -- who may offboard and rotate: the hostile tenant -------------------------------------------


def _key(env: OAuthEnv, workspace: str, scopes: list[str]) -> str:
    stub = keys_grpc.ApiKeyServiceStub(grpc.insecure_channel(env.admin))
    resp = stub.CreateApiKey(
        keys_pb.CreateApiKeyRequest(workspace=workspace, name="k", scopes=scopes),
        metadata=bearer(env.operator_key),
    )
    return str(resp.key)


def test_another_workspace_cannot_offboard_a_member_nor_rotate_keys(oauth_env: OAuthEnv) -> None:
    env = oauth_env
    user_id = env.member()
    users = pb_grpc.UserServiceStub(grpc.insecure_channel(env.admin))
    globex_admin = _key(env, "globex", ["admin:full"])
    acme_manager = _key(env, "acme", ["keys:manage"])
    calls = [
        (users.DisableUser, pb.DisableUserRequest(id=user_id)),
        (users.DeleteUser, pb.DeleteUserRequest(id=user_id)),
        (users.ResetUserPassword, pb.ResetUserPasswordRequest(id=user_id, password=PASSWORD)),
    ]
    # Another workspace's admin is told the member does not exist; acme's own manager, who
    # lacks admin:full, is told so.
    for caller, code in (
        (globex_admin, grpc.StatusCode.NOT_FOUND),
        (acme_manager, grpc.StatusCode.PERMISSION_DENIED),
    ):
        for method, request in calls:
            with pytest.raises(grpc.RpcError) as info:
                method(request, metadata=bearer(caller))
            assert info.value.code() is code
    acme_admin = _key(env, "acme", ["admin:full"])
    signing = pb_grpc.SigningKeyServiceStub(grpc.insecure_channel(env.admin))
    with pytest.raises(grpc.RpcError) as info:
        signing.RotateSigningKey(
            pb.RotateSigningKeyRequest(immediate=True), metadata=bearer(acme_admin)
        )
    assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
    # Nothing changed: the member is active, one signing key is current.
    listed = users.ListUsers(pb.ListUsersRequest(workspace="acme"), metadata=bearer(acme_admin))
    assert [u.state for u in listed.users] == ["active"]
    keys = signing.ListSigningKeys(pb.ListSigningKeysRequest(), metadata=bearer(env.operator_key))
    assert [k.state for k in keys.keys] == ["current"]
    with pytest.raises(grpc.RpcError) as info:
        users.DisableUser(pb.DisableUserRequest(id="usr_nope"), metadata=bearer(acme_admin))
    assert info.value.code() is grpc.StatusCode.NOT_FOUND
