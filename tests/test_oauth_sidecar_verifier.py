"""The sidecar's token verifier over a replica fed with the control plane's change entries."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from sidecar.authz.decision import Reason
from sidecar.authz.engine import Engine, TokenDenied
from sidecar.authz.policy import parse_policy
from sidecar.authz.replica import Replica
from sidecar.authz.token_verifier import ReplicaTokenVerifier
from sidecar.core.changes import signing_key_retired, signing_key_upserted
from sidecar.core.clock import FakeClock
from sidecar.core.models import Change
from sidecar.oauth import rfc9068
from tests.support.signing import key_pair

ISSUER = "http://127.0.0.1:8080"
NOW = 1_800_000_000


def _token(key: object, kid: str, grant: str = "grt_1", ttl: int = 3600) -> str:
    assert isinstance(key, rsa.RSAPrivateKey)
    return rfc9068.issue(
        (kid, key),
        issuer=ISSUER,
        audience="statuspulse-api",
        subject="usr_1",
        client_id="app_1",
        scopes=frozenset({"checks:read"}),
        workspace="acme",
        grant_id=grant,
        now=NOW,
        ttl=ttl,
    ).token


ANY_PATH = parse_policy('[[routes]]\nname = "c"\npath = "/**"\nscopes = ["checks:read"]\n')


def _verifying_engine(replica: Replica, clock: FakeClock) -> Engine:
    """An engine verifying access tokens from ``replica``, every path needing checks:read."""
    return Engine(
        replica, ANY_PATH, clock, token_verifier=ReplicaTokenVerifier(ISSUER, "statuspulse-api")
    )


def _at(change: Change, revision: int) -> Change:
    return Change(change.kind, change.subject, change.payload, revision)


@pytest.fixture
def keyed() -> tuple[Replica, object, str]:
    key, private = key_pair(NOW)
    replica = Replica()
    replica.load_snapshot(1, [signing_key_upserted(key)])
    return replica, private, key.kid


def test_verifies_with_replica_keys_and_follows_rotation(
    keyed: tuple[Replica, object, str],
) -> None:
    replica, private, kid = keyed
    verify = ReplicaTokenVerifier(ISSUER, "statuspulse-api")
    identity = verify(_token(private, kid), replica, NOW + 1)
    assert identity.kind == "access_token" and identity.subject == "usr_1"
    assert identity.grant_id == "grt_1" and identity.scopes == frozenset({"checks:read"})

    new, new_private = key_pair(NOW)
    with pytest.raises(TokenDenied) as info:
        verify(_token(new_private, new.kid), replica, NOW + 1)
    assert info.value.reason is Reason.UNKNOWN_KEY
    replica.apply(_at(signing_key_upserted(new), 2))
    assert verify(_token(new_private, new.kid), replica, NOW + 1).subject == "usr_1"
    replica.apply(_at(signing_key_retired(kid), 3))
    with pytest.raises(TokenDenied) as info:
        verify(_token(private, kid), replica, NOW + 1)
    assert info.value.reason is Reason.UNKNOWN_KEY


def test_unusable_replica_keys_are_ignored(keyed: tuple[Replica, object, str]) -> None:
    replica, private, kid = keyed
    replica.signing_keys = {**replica.signing_keys, "bad": {"kid": "bad", "alg": "HS256"}}
    verify = ReplicaTokenVerifier(ISSUER, "statuspulse-api")
    assert verify(_token(private, kid), replica, NOW).id.startswith("at_")


def test_engine_denies_revoked_grants_and_jtis_after_caching(
    keyed: tuple[Replica, object, str],
) -> None:
    replica, private, kid = keyed
    policy = parse_policy(
        '[[routes]]\nname = "c"\npath = "/v1/workspaces/{workspace}/checks/**"\n'
        'scopes = ["checks:read"]\n'
    )
    clock = FakeClock(NOW + 1)
    engine = Engine(
        replica, policy, clock, token_verifier=ReplicaTokenVerifier(ISSUER, "statuspulse-api")
    )
    token = _token(private, kid)
    assert engine.authorize(token, ["checks:read"]).reason is Reason.OK
    assert engine.authorize(token, ["metrics:read"]).reason is Reason.INSUFFICIENT_SCOPE
    replica.apply(
        Change("grant.revoked", "grt_1", {"grant_id": "grt_1", "expires_at": NOW + 3600}, 2)
    )
    assert engine.authorize(token, ["checks:read"]).reason is Reason.TOKEN_REVOKED
    other = _token(private, kid, grant="grt_2")
    identity = engine.authorize(other, ["checks:read"]).identity
    assert identity is not None
    replica.apply(
        Change("token.revoked", identity.id, {"jti": identity.id, "expires_at": NOW + 3600}, 3)
    )
    assert engine.authorize(other, ["checks:read"]).reason is Reason.TOKEN_REVOKED
    clock.advance(3600 + 30)
    assert engine.authorize(_token(private, kid, grant="grt_3"), []).reason is Reason.TOKEN_EXPIRED


@pytest.mark.parametrize(("size", "verifications"), [(100, 1), (0, 3)])
def test_token_cache_size_zero_verifies_every_request(
    keyed: tuple[Replica, object, str], size: int, verifications: int
) -> None:
    """The cache spares repeats the signature check; size 0 turns it off (cold every time)."""
    replica, private, kid = keyed
    real = ReplicaTokenVerifier(ISSUER, "statuspulse-api")
    calls: list[str] = []

    def counting(token: str, replica: Replica, now: float) -> object:
        calls.append(token)
        return real(token, replica, now)

    engine = Engine(
        replica, ANY_PATH, FakeClock(NOW + 1), token_verifier=counting, token_cache_size=size
    )
    token = _token(private, kid)
    for _ in range(3):
        assert engine.authorize(token, ["checks:read"]).reason is Reason.OK
    assert len(calls) == verifications


def test_cached_token_answers_only_while_the_cached_verification_holds(
    keyed: tuple[Replica, object, str],
) -> None:
    """The compiled Check path's lookup: an identity only when ``_access_token`` would accept
    the token from the cache alone; None sends it to the Python path (which refuses it)."""
    replica, private, kid = keyed
    clock = FakeClock(NOW + 1)
    engine = _verifying_engine(replica, clock)
    token, other = _token(private, kid, ttl=600), _token(private, kid, grant="grt_2")
    digest, other_digest = (hashlib.sha256(t.encode()).digest() for t in (token, other))
    assert engine.cached_token(digest, clock.now()) is None  # never verified
    allowed = engine.authorize(token, [])
    assert allowed.reason is Reason.OK
    assert engine.cached_token(digest, clock.now()) is allowed.identity
    assert engine.cached_token(digest, NOW + 600) is allowed.identity  # at exp, in the leeway
    assert engine.cached_token(digest, NOW + 630) is None  # at exp + the 30 s leeway
    assert engine.authorize(other, []).reason is Reason.OK
    replica.apply(
        Change("grant.revoked", "grt_2", {"grant_id": "grt_2", "expires_at": NOW + 3600}, 2)
    )
    assert engine.cached_token(other_digest, clock.now()) is None
    assert engine.cached_token(digest, clock.now()) is allowed.identity
    engine.token_verifier = None
    assert engine.cached_token(digest, clock.now()) is None
    engine.token_verifier = ReplicaTokenVerifier(ISSUER, "statuspulse-api")
    replica.apply(_at(signing_key_retired(kid), 3))
    assert engine.cached_token(digest, clock.now()) is None
    assert engine.authorize(token, []).reason is Reason.UNKNOWN_KEY


def test_repeats_inside_the_leeway_do_not_alternate(keyed: tuple[Replica, object, str]) -> None:
    """A fresh verification accepts a token until exp plus the leeway; the cached one ended at
    exp, so inside the leeway repeats went allowed (verified), expired (cache), allowed..."""
    replica, private, kid = keyed
    clock = FakeClock(NOW + 1)
    engine = _verifying_engine(replica, clock)
    token = _token(private, kid, ttl=600)
    clock.advance(599 + 10)  # 10 s past exp
    assert [engine.authorize(token, []).reason for _ in range(4)] == [Reason.OK] * 4
    clock.advance(20)  # exp + 30 s
    assert [engine.authorize(token, []).reason for _ in range(3)] == [Reason.TOKEN_EXPIRED] * 3
