"""The OAuth building blocks on their own: PKCE, credential formats, passwords, throttling,
client authentication, redirect-URI rules, error mapping and settings."""

from __future__ import annotations

import ast
import base64
from dataclasses import replace
from pathlib import Path

import pytest

from sidecar.config import ConfigError, load_settings
from sidecar.core import credentials, errors, passwords
from sidecar.core.apps import redirect_uri
from sidecar.core.clock import FakeClock
from sidecar.core.oauth_models import OAuthApp
from sidecar.http.errors import HTTP_ERRORS, oauth_error
from sidecar.oauth import client_auth, rfc7636
from sidecar.oauth.authorization import response_uri
from sidecar.oauth.errors import (
    ALL_OAUTH_ERRORS,
    InvalidClient,
    InvalidGrant,
    InvalidRequest,
    OAuth2Error,
    TemporarilyUnavailable,
)
from sidecar.oauth.throttle import SignInThrottle, ThrottlePolicy
from sidecar.store.sql.sqlite import SqliteStore

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"grpc", "redis", "sqlite3", "psycopg", "starlette", "uvicorn", "envoy", "google"}


# -- PKCE (RFC 7636) -----------------------------------------------------------------------------


def test_s256_matches_the_rfc_7636_appendix_b_example() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert rfc7636.s256(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    rfc7636.verify(verifier, "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM", "S256")


@pytest.mark.parametrize(
    ("challenge", "method"),
    [
        ("", "S256"),
        ("a" * 43, ""),
        ("a" * 43, "plain"),
        ("a" * 42, "S256"),
        ("a" * 43 + "=", "S256"),
    ],
)
def test_bad_challenges_are_invalid_request(challenge: str, method: str) -> None:
    with pytest.raises(InvalidRequest):
        rfc7636.validate_challenge(challenge, method)


def test_verifier_rules() -> None:
    challenge = rfc7636.s256("v" * 43)
    with pytest.raises(InvalidRequest):
        rfc7636.verify("", challenge, "S256")
    with pytest.raises(InvalidRequest):
        rfc7636.verify("short", challenge, "S256")
    with pytest.raises(InvalidGrant):
        rfc7636.verify("w" * 43, challenge, "S256")
    # A verifier for a code that had no challenge is a downgrade attempt (RFC 9700 §4.8.2).
    with pytest.raises(InvalidGrant):
        rfc7636.verify("v" * 43, "", "")


# -- credentials and passwords -------------------------------------------------------------------


@pytest.mark.parametrize(
    "prefix",
    [credentials.REFRESH_TOKEN, credentials.AUTHORIZATION_CODE, credentials.CLIENT_SECRET],
)
def test_credential_format(prefix: str) -> None:
    value = credentials.mint(prefix)
    assert value.startswith(prefix) and credentials.is_well_formed(value, prefix)
    assert not credentials.is_well_formed(value[:-1] + ("A" if value[-1] != "A" else "B"), prefix)
    assert not credentials.is_well_formed(value[:-1], prefix)
    assert not credentials.is_well_formed("spk_" + value[len(prefix) :], prefix)
    assert credentials.digest(value) != credentials.digest(credentials.mint(prefix))


def test_password_hash_round_trip() -> None:
    stored = passwords.hash_password("correct horse battery staple")
    assert stored.startswith("scrypt$14$8$5$")
    assert passwords.verify_password("correct horse battery staple", stored)
    assert not passwords.verify_password("correct horse battery stapl", stored)
    assert not passwords.verify_password("x", "bcrypt$whatever")
    assert not passwords.verify_password("x", "scrypt$not$numbers$at$all$")
    assert stored != passwords.hash_password("correct horse battery staple")  # salted


@pytest.mark.parametrize(
    ("password", "ok"),
    [("short", False), ("x" * 12, True), ("a\nb" * 6, False), ("x" * 513, False)],
)
def test_password_policy(password: str, ok: bool) -> None:
    assert (passwords.password_problem(password) == "") is ok


# -- throttling -----------------------------------------------------------------------------------


def test_throttle_backs_off_per_account_and_source_together() -> None:
    clock = FakeClock()
    throttle = SignInThrottle(clock, ThrottlePolicy(free_failures=3, max_backoff=8))
    for _ in range(3):
        assert throttle.retry_after("acme/a", "10.0.0.1") == 0
        throttle.failed("acme/a", "10.0.0.1")
    # The guessing pair waits a short backoff; the member, from elsewhere, does not.
    assert throttle.retry_after("acme/a", "10.0.0.1") == 1
    assert throttle.retry_after("acme/a", "10.0.0.2") == 0
    assert throttle.retry_after("acme/b", "10.0.0.1") == 0
    waits = []
    for _ in range(5):
        clock.advance(throttle.retry_after("acme/a", "10.0.0.1"))
        throttle.failed("acme/a", "10.0.0.1")
        waits.append(throttle.retry_after("acme/a", "10.0.0.1"))
    assert waits == [2, 4, 8, 8, 8]  # doubling, capped at max_backoff


def test_throttle_per_source_across_accounts() -> None:
    clock = FakeClock()
    throttle = SignInThrottle(clock, ThrottlePolicy(free_failures=100, per_source=5, window=60))
    for account in "abcde":
        throttle.failed(f"acme/{account}", "10.0.0.1")
    assert throttle.retry_after("acme/z", "10.0.0.1") > 0  # the source, for any account
    assert throttle.retry_after("acme/z", "10.0.0.2") == 0
    clock.advance(61)
    assert throttle.retry_after("acme/z", "10.0.0.1") == 0


def test_successful_sign_in_clears_the_pair() -> None:
    throttle = SignInThrottle(FakeClock(), ThrottlePolicy(free_failures=2, per_source=100))
    throttle.failed("acme/a", "s")
    throttle.succeeded("acme/a", "s")
    throttle.failed("acme/a", "s")
    assert throttle.retry_after("acme/a", "s") == 0


# -- client authentication (RFC 6749 §2.3) -------------------------------------------------------


def _basic(client_id: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


def _app(confidential: bool, secret: str = "") -> OAuthApp:
    return OAuthApp(
        id="app_1",
        workspace="acme",
        name="x",
        redirect_uris=("https://a.example/cb",),
        scopes=frozenset({"checks:read"}),
        confidential=confidential,
        created_at=0,
        created_by="key_1",
        secret_digest=credentials.digest(secret) if secret else None,
    )


def test_client_credentials_parsing() -> None:
    assert client_auth.from_request("", {}) is None
    assert client_auth.from_request("", {"client_id": "app_1"}) == client_auth.ClientCredentials(
        "app_1", "", "none"
    )
    basic = client_auth.from_request(_basic("app_1", "s%3Aecret"), {})
    assert basic == client_auth.ClientCredentials("app_1", "s:ecret", "client_secret_basic")
    with pytest.raises(InvalidRequest):
        client_auth.from_request(_basic("app_1", "s"), {"client_secret": "s"})
    with pytest.raises(InvalidRequest):
        client_auth.from_request(_basic("app_1", "s"), {"client_id": "app_2"})
    with pytest.raises(InvalidClient):
        client_auth.from_request("Basic !!!", {})
    with pytest.raises(InvalidClient):
        client_auth.from_request("Digest x", {})


def test_client_authentication_rules() -> None:
    secret = credentials.mint(credentials.CLIENT_SECRET)
    confidential = _app(True, secret)
    ok = client_auth.ClientCredentials("app_1", secret, client_auth.BASIC)
    assert client_auth.authenticate(confidential, ok, 0) is confidential
    for creds in (
        client_auth.ClientCredentials("app_1", "", client_auth.NONE),
        client_auth.ClientCredentials(
            "app_1", credentials.mint(credentials.CLIENT_SECRET), "client_secret_post"
        ),
        client_auth.ClientCredentials("app_2", secret, client_auth.BASIC),
        None,
    ):
        with pytest.raises(InvalidClient):
            client_auth.authenticate(confidential, creds, 0)
    public = _app(False)
    none = client_auth.ClientCredentials("app_1", "", client_auth.NONE)
    assert client_auth.authenticate(public, none, 0) is public
    with pytest.raises(InvalidClient):
        client_auth.authenticate(public, ok, 0)
    with pytest.raises(InvalidClient):
        client_auth.authenticate(None, none, 0)


def test_one_client_authenticator_with_per_endpoint_methods(tmp_path: Path) -> None:
    """Token, revocation and introspection share the seam; introspection narrows the methods."""
    store = SqliteStore(tmp_path / "spauth.db")
    secret = credentials.mint(credentials.CLIENT_SECRET)
    with store.transaction() as uow:
        uow.oauth.apps.insert(_app(True, secret))
        uow.oauth.apps.insert(replace(_app(False), id="app_2"))
    clients = client_auth.ClientAuthenticator(store, FakeClock(0))
    assert clients.authenticate_client(_basic("app_1", secret), {}).id == "app_1"
    assert clients.authenticate_client("", {"client_id": "app_2"}).id == "app_2"
    confidential_only = client_auth.CONFIDENTIAL_METHODS
    assert clients.authenticate_client(_basic("app_1", secret), {}, confidential_only).confidential
    with pytest.raises(InvalidClient):
        clients.authenticate_client("", {"client_id": "app_2"}, confidential_only)
    for authorization, form in (("", {}), ("", {"client_id": "app_9"}), (_basic("app_1", "x"), {})):
        with pytest.raises(InvalidClient):
            clients.authenticate_client(authorization, form)
    store.close()


def test_only_the_client_authenticator_reads_client_credentials() -> None:
    """A rule lives once: no endpoint parses client credentials on its own."""
    readers = [
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "sidecar").rglob("*.py")
        if "from_request(" in path.read_text() and path.name != "client_auth.py"
    ]
    assert readers == []


# -- redirect URIs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri",
    [
        "https://app.example/cb",
        "https://app.example/cb?tenant=1",
        "http://127.0.0.1:8400/cb",
        "http://localhost/cb",
        "http://[::1]:9/cb",
        "com.example.app:/oauth2redirect",
    ],
)
def test_acceptable_redirect_uris(uri: str) -> None:
    assert redirect_uri(uri) == uri


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "http://app.example/cb",
        "https://app.example/cb#x",
        "javascript:alert(1)",
        "/relative/cb",
        "https:///nohost",
        "https://app.example/a b",
        "data:text/html,hi",
    ],
)
def test_unacceptable_redirect_uris(uri: str) -> None:
    with pytest.raises(errors.InvalidArgument):
        redirect_uri(uri)


def test_response_uri_keeps_the_existing_query() -> None:
    out = response_uri("https://a.example/cb?tenant=1", {"code": "c", "state": "a b&c", "x": ""})
    assert out == "https://a.example/cb?tenant=1&code=c&state=a+b%26c"


# -- errors ---------------------------------------------------------------------------------------


def test_oauth_errors_carry_wire_code_and_status() -> None:
    for cls in ALL_OAUTH_ERRORS:
        assert isinstance(cls.error, str) and 400 <= cls.status_code <= 503
    assert set(ALL_OAUTH_ERRORS) == {OAuth2Error, *_subclasses(OAuth2Error)}
    described = InvalidRequest('bad "quote" \\ and\nnewline')
    assert described.body() == {
        "error": "invalid_request",
        "error_description": "bad ?quote? ? and?newline",
    }


def _subclasses(cls: type) -> set[type]:
    out: set[type] = set()
    for sub in cls.__subclasses__():
        out |= {sub, *_subclasses(sub)}
    return out


def test_every_domain_error_has_an_http_mapping() -> None:
    for cls in errors.ALL_ERRORS:
        assert cls in HTTP_ERRORS, f"{cls.__name__} has no OAuth/HTTP mapping"
    unavailable = oauth_error(errors.Unavailable("store unavailable: disk I/O error"))
    assert isinstance(unavailable, TemporarilyUnavailable)
    assert unavailable.body() == {"error": "temporarily_unavailable"}  # no internal detail


@pytest.mark.parametrize(
    "path", sorted((ROOT / "sidecar" / "oauth").rglob("*.py")), ids=lambda p: p.name
)
def test_oauth_package_imports_no_transport(path: Path) -> None:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    assert not names & FORBIDDEN


# -- settings -------------------------------------------------------------------------------------


def test_oauth_settings() -> None:
    settings = load_settings(
        {"oauth_issuer": "https://auth.example", "oauth_access_token_ttl": "30m"}, environ={}
    )
    assert settings.oauth_issuer == "https://auth.example"
    assert settings.oauth_access_token_ttl == 1800
    env = load_settings(environ={"SPAUTH_OAUTH_AUDIENCE": "api.example"})
    assert env.oauth_audience == "api.example"


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"oauth_issuer": "auth.example"}, "oauth_issuer"),
        ({"oauth_issuer": "https://auth.example/"}, "oauth_issuer"),
        ({"oauth_issuer": "https://auth.example?x=1"}, "oauth_issuer"),
        ({"oauth_audience": " "}, "oauth_audience"),
        ({"oauth_access_token_ttl": "2d"}, "oauth_access_token_ttl"),
        ({"oauth_signing_key_rotation": "1h"}, "oauth_signing_key_rotation"),
    ],
)
def test_bad_oauth_settings_name_the_setting(overrides: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_settings(overrides, environ={})


def test_store_url_is_absolute_for_a_relative_data_dir() -> None:
    # A relative data_dir once put the database under "/" (sqlite:///rel -> /rel).
    url = load_settings({"data_dir": "rel/dir"}, environ={}).store_url
    assert url == f"sqlite:///{Path('rel/dir').absolute() / 'spauth.db'}"
