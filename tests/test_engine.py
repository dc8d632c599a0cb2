"""The decision engine over a replica built from change entries and an injected clock."""

from __future__ import annotations

import hashlib

import pytest

from sidecar.authz.decision import Reason
from sidecar.authz.engine import CheckInput, Engine
from sidecar.authz.policy import parse_policy
from sidecar.authz.policy_source import default_policy_text
from sidecar.authz.replica import Replica
from sidecar.core import keyformat
from sidecar.core.clock import FakeClock
from sidecar.core.models import Change
from sidecar.ratelimit.local import AbuseLimits, WindowRateLimiter


def upsert(key: str, key_id: str, workspace: str, scopes: list[str], expires_at: float) -> Change:
    payload = {
        "id": key_id,
        "digest": hashlib.sha256(key.encode()).hexdigest(),
        "workspace": workspace,
        "scopes": scopes,
        "expires_at": int(expires_at),
    }
    return Change("credential.upserted", key_id, payload)


@pytest.fixture
def keys() -> dict[str, str]:
    return {name: keyformat.mint_key() for name in ("reader", "admin", "op", "revoked", "short")}


@pytest.fixture
def engine(keys: dict[str, str], clock: FakeClock) -> Engine:
    replica = Replica()
    now = clock.now()
    replica.load_snapshot(
        5,
        [
            upsert(keys["reader"], "key_reader", "acme", ["checks:read"], now + 3600),
            upsert(keys["admin"], "key_admin", "acme", ["admin:full"], now + 3600),
            upsert(keys["op"], "key_op", "*", ["admin:full"], now + 3600),
            upsert(keys["revoked"], "key_revoked", "acme", ["checks:read"], now + 3600),
            upsert(keys["short"], "key_short", "acme", ["checks:read"], now + 60),
        ],
    )
    replica.apply(Change("credential.revoked", "key_revoked", {"id": "key_revoked"}, revision=6))
    replica.last_contact = now
    return Engine(replica, parse_policy(default_policy_text()), clock, max_staleness=300)


def check(engine: Engine, path: str, headers: dict[str, str], method: str = "GET") -> Reason:
    return engine.check(CheckInput(method, path, "api", headers, {})).reason


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_table_of_decisions(engine: Engine, keys: dict[str, str]) -> None:
    ok = "/v1/workspaces/acme/checks"
    # The checksum's last character changed, to another one (CI once minted a key ending in the
    # fixed replacement, which then was the key itself).
    reader = keys["reader"]
    tampered = reader[:-1] + ("x" if reader[-1] != "x" else "y")
    cases = [
        (ok, bearer(keys["reader"]), Reason.OK),
        (ok + "?token=x", {"x-api-key": keys["reader"]}, Reason.OK),
        (ok, {"authorization": f"bearer   {keys['reader']}"}, Reason.OK),
        ("/v1/workspaces/globex/checks", bearer(keys["reader"]), Reason.WORKSPACE_MISMATCH),
        ("/v1/workspaces/acme/metrics", bearer(keys["reader"]), Reason.INSUFFICIENT_SCOPE),
        ("/v1/workspaces/acme/metrics", bearer(keys["admin"]), Reason.OK),
        # The operator key is an admin credential: refused on routes unless the policy allows it.
        ("/v1/workspaces/globex/metrics", bearer(keys["op"]), Reason.OPERATOR_NOT_ALLOWED),
        ("/nowhere", bearer(keys["reader"]), Reason.NO_ROUTE),
        ("/nowhere", {}, Reason.MISSING_CREDENTIAL),
        ("/healthz", {}, Reason.PUBLIC_ROUTE),
        (ok, {}, Reason.MISSING_CREDENTIAL),
        (ok, {"authorization": "Bearer "}, Reason.MALFORMED_CREDENTIAL),
        (ok, {"authorization": "Basic dXNlcjpwYXNz"}, Reason.MALFORMED_CREDENTIAL),
        (
            ok,
            {"authorization": f"Bearer {keys['reader']}, Bearer {keys['admin']}"},
            Reason.MALFORMED_CREDENTIAL,
        ),
        (ok, bearer(tampered), Reason.MALFORMED_CREDENTIAL),
        (ok, bearer(keyformat.mint_key()), Reason.UNKNOWN_CREDENTIAL),
        (ok, bearer(keys["revoked"]), Reason.REVOKED_CREDENTIAL),
        (ok, bearer("x" * 10_000), Reason.MALFORMED_CREDENTIAL),
        (ok, bearer("spk_\ufffd" + "A" * 37), Reason.MALFORMED_CREDENTIAL),
        (ok, bearer("a.b.c"), Reason.MALFORMED_CREDENTIAL),  # no token verifier configured
    ]
    for path, headers, expected in cases:
        assert check(engine, path, headers) == expected, (path, headers)


def test_expiry_is_evaluated_against_the_clock(
    engine: Engine, keys: dict[str, str], clock: FakeClock
) -> None:
    path = "/v1/workspaces/acme/checks"
    assert check(engine, path, bearer(keys["short"])) == Reason.OK
    clock.advance(60)
    assert check(engine, path, bearer(keys["short"])) == Reason.EXPIRED_CREDENTIAL
    assert check(engine, path, bearer(keys["reader"])) == Reason.OK


def test_fails_closed_when_not_loaded_or_stale(
    engine: Engine, keys: dict[str, str], clock: FakeClock
) -> None:
    path = "/v1/workspaces/acme/checks"
    clock.advance(301)
    assert check(engine, path, bearer(keys["reader"])) == Reason.REPLICA_STALE
    assert check(engine, "/healthz", {}) == Reason.PUBLIC_ROUTE
    fresh = Engine(Replica(), engine.policy, clock)
    assert check(fresh, path, bearer(keys["reader"])) == Reason.REPLICA_NOT_READY


def test_decision_ids_are_unique(engine: Engine) -> None:
    ids = {engine.check(CheckInput("GET", "/healthz", "", {}, {})).decision_id for _ in range(1000)}
    assert len(ids) == 1000


def test_authorize_with_explicit_scopes(engine: Engine, keys: dict[str, str]) -> None:
    assert engine.authorize(keys["reader"], ["checks:read"], "acme").reason == Reason.OK
    assert engine.authorize(keys["reader"], ["checks:write"]).reason == Reason.INSUFFICIENT_SCOPE
    assert engine.authorize(keys["reader"], ["checks:read"], "globex").reason == (
        Reason.WORKSPACE_MISMATCH
    )
    assert engine.authorize("", ["checks:read"]).reason == Reason.MISSING_CREDENTIAL


# -- one pipeline for Check, Authorize and Introspect ------------------------------------------


@pytest.fixture
def limited(keys: dict[str, str], clock: FakeClock) -> Engine:
    """The engine above with abuse limits, and a key allowed two requests a minute."""
    replica = Replica()
    now = clock.now()
    metered = upsert(keys["reader"], "key_reader", "acme", ["checks:read"], now + 3600)
    assert isinstance(metered.payload, dict)
    metered.payload.update(rate_limit=2, rate_period=60)
    replica.load_snapshot(
        5,
        [
            metered,
            upsert(keys["revoked"], "key_revoked", "acme", ["checks:read"], now + 3600),
            upsert(keys["op"], "key_op", "*", ["admin:full"], now + 3600),
        ],
    )
    replica.apply(Change("credential.revoked", "key_revoked", {"id": "key_revoked"}, revision=6))
    replica.last_contact = now
    limiter = WindowRateLimiter(AbuseLimits(source_failures=0, key_failures=3))
    return Engine(replica, parse_policy(default_policy_text()), clock, limiter=limiter)


PATH = "/v1/workspaces/acme/checks/1"


def test_authorize_spends_the_same_rate_limit_as_check(
    limited: Engine, keys: dict[str, str]
) -> None:
    assert check(limited, PATH, bearer(keys["reader"])) == Reason.OK
    assert limited.authorize(keys["reader"], ["checks:read"]).reason == Reason.OK
    over = limited.authorize_route(keys["reader"], "GET", PATH, "api")
    assert (over.reason, over.detail) == (Reason.RATE_LIMITED, "rate")
    assert check(limited, PATH, bearer(keys["reader"])) == Reason.RATE_LIMITED


def test_introspection_skips_only_the_rate_limit(limited: Engine, keys: dict[str, str]) -> None:
    """The named option: spend_rate=False asks without using the key."""
    for _ in range(5):
        assert limited.introspect(keys["reader"]).reason == Reason.OK
    assert limited.authorize(keys["reader"], (), spend_rate=False).reason == Reason.OK
    assert check(limited, PATH, bearer(keys["reader"])) == Reason.OK  # nothing was spent
    for _ in range(3):  # failed attempts count wherever the key is presented
        assert limited.introspect(keys["revoked"]).reason == Reason.REVOKED_CREDENTIAL
    blocked = limited.authorize(keys["revoked"], ["checks:read"])
    assert (blocked.reason, blocked.detail) == (Reason.RATE_LIMITED, "key")
    assert check(limited, PATH, bearer(keys["revoked"])) == Reason.RATE_LIMITED


def test_one_workspace_rule(engine: Engine, keys: dict[str, str]) -> None:
    other = "/v1/workspaces/globex/checks/1"
    assert check(engine, other, bearer(keys["reader"])) == Reason.WORKSPACE_MISMATCH
    assert engine.authorize_route(keys["reader"], "GET", other, "api").reason == (
        Reason.WORKSPACE_MISMATCH
    )
    # The caller's workspace binds on top of the route's.
    assert engine.authorize_route(keys["reader"], "GET", PATH, "api", "globex").reason == (
        Reason.WORKSPACE_MISMATCH
    )
    assert engine.authorize_route(keys["reader"], "GET", PATH, "api", "acme").reason == Reason.OK
    # The operator key is refused on routes, in-cluster as on a Check (issue #13).
    assert engine.authorize_route(keys["op"], "GET", other, "api", "acme").reason == (
        Reason.OPERATOR_NOT_ALLOWED
    )
    assert check(engine, other, bearer(keys["op"])) == Reason.OPERATOR_NOT_ALLOWED
    assert engine.authorize(keys["op"], ["checks:read"], "globex").reason == Reason.OK
    assert engine.authorize_route(keys["reader"], "GET", "/nowhere", "api").reason == (
        Reason.NO_ROUTE
    )
    assert engine.authorize_route(keys["reader"], "GET", "/v1/a/../b", "api").reason == (
        Reason.NON_CANONICAL_PATH
    )
