"""Abuse limits in memory: sliding windows, failed credentials per source and per key id, per-key
request rates, decided by the engine with an injected clock (never a sleep)."""

from __future__ import annotations

import hashlib

import pytest

from sidecar.authz.decision import Decision, Reason
from sidecar.authz.engine import CheckInput, Engine
from sidecar.authz.policy import parse_policy
from sidecar.authz.policy_source import default_policy_text
from sidecar.authz.ratelimit import CREDENTIAL_FAILURES
from sidecar.authz.replica import Replica
from sidecar.core import keyformat
from sidecar.core.clock import FakeClock
from sidecar.core.errors import InvalidArgument
from sidecar.core.models import Change
from sidecar.core.validation import format_rate, parse_rate
from sidecar.ratelimit import AbuseLimits, BucketWindow, WindowRateLimiter

LIMITS = AbuseLimits(source_failures=5, key_failures=3, failure_window=60, buckets=10)


def upsert(key: str, key_id: str, expires_at: float, rate: tuple[int, int] = (0, 0)) -> Change:
    payload: dict[str, object] = {
        "id": key_id,
        "digest": hashlib.sha256(key.encode()).hexdigest(),
        "workspace": "acme",
        "scopes": ["checks:read"],
        "expires_at": int(expires_at),
    }
    if rate[0]:
        payload["rate_limit"], payload["rate_period"] = rate
    return Change("credential.upserted", key_id, payload)


@pytest.fixture
def keys() -> dict[str, str]:
    return {name: keyformat.mint_key() for name in ("good", "revoked", "limited")}


@pytest.fixture
def engine(keys: dict[str, str], clock: FakeClock) -> Engine:
    replica = Replica()
    now = clock.now()
    replica.load_snapshot(
        5,
        [
            upsert(keys["good"], "key_good", now + 86400),
            upsert(keys["revoked"], "key_revoked", now + 86400),
            upsert(keys["limited"], "key_limited", now + 86400, rate=(10, 1)),
        ],
    )
    replica.apply(Change("credential.revoked", "key_revoked", {"id": "key_revoked"}, revision=6))
    replica.last_contact = now
    policy = parse_policy(default_policy_text())
    return Engine(replica, policy, clock, limiter=WindowRateLimiter(LIMITS))


def check(engine: Engine, key: str, source: str = "203.0.113.7") -> Decision:
    headers = {"authorization": f"Bearer {key}"}
    return engine.check(CheckInput("GET", "/v1/workspaces/acme/checks", "api", headers, {}, source))


def unknown() -> str:
    return keyformat.mint_key()


# -- the window -----------------------------------------------------------------------------------


def test_window_counts_within_its_span_and_slides_in_bucket_steps() -> None:
    w = BucketWindow(60, 10)  # 6 s buckets
    for t in (0.0, 1.0, 7.0, 30.0):
        w.add(t)
    assert w.total(30.0) == 4
    assert w.total(59.9) == 4
    assert w.total(60.0) == 2  # the bucket [0, 6) left the window
    assert w.total(66.0) == 1
    assert w.total(500.0) == 0


def test_window_reopens_when_the_tipping_bucket_leaves() -> None:
    w = BucketWindow(60, 10)
    for t in (0.0, 0.5, 12.0, 13.0):
        w.add(t)
    assert w.reopen_at(13.0, 5) == 13.0  # below the limit already
    assert w.reopen_at(13.0, 4) == 60.0  # [0, 6) leaves at 60: 2 left
    assert w.reopen_at(13.0, 2) == 72.0  # both buckets must go


def test_window_set_replaces_a_bucket_and_ignores_ones_outside() -> None:
    w = BucketWindow(10, 10)
    w.add(5.0)
    w.set(5, 7, 5.5)
    w.set(-20, 100, 5.5)
    assert w.total(5.5) == 7


def test_a_clock_stepping_back_counts_in_the_newest_bucket() -> None:
    w = BucketWindow(10, 10)
    w.add(9.0)
    w.add(3.0)
    assert w.total(9.0) == 2


# -- failed credentials -----------------------------------------------------------------------


def test_429_after_n_failures_from_one_source(engine: Engine) -> None:
    reasons = [check(engine, unknown()).reason for _ in range(LIMITS.source_failures)]
    assert reasons == [Reason.UNKNOWN_CREDENTIAL] * LIMITS.source_failures
    limited = check(engine, unknown())
    assert limited.reason is Reason.RATE_LIMITED
    assert limited.http_status == 429


def test_a_blocked_source_is_refused_even_with_a_valid_key(
    engine: Engine, keys: dict[str, str]
) -> None:
    for _ in range(LIMITS.source_failures):
        check(engine, unknown())
    # Otherwise a guesser would learn which key is valid from the status code.
    assert check(engine, keys["good"]).reason is Reason.RATE_LIMITED


def test_a_different_source_is_unaffected(engine: Engine, keys: dict[str, str]) -> None:
    for _ in range(LIMITS.source_failures + 3):
        check(engine, unknown(), source="203.0.113.7")
    assert check(engine, unknown(), source="198.51.100.2").reason is Reason.UNKNOWN_CREDENTIAL
    assert check(engine, keys["good"], source="198.51.100.2").reason is Reason.OK


def test_the_window_slides(engine: Engine, keys: dict[str, str], clock: FakeClock) -> None:
    for _ in range(LIMITS.source_failures - 1):
        check(engine, unknown())
    clock.advance(59)  # still within the window: one more failure blocks
    check(engine, unknown())
    assert check(engine, keys["good"]).reason is Reason.RATE_LIMITED
    clock.advance(2)  # the first four left the window: one failure in it now
    assert check(engine, keys["good"]).reason is Reason.OK
    assert check(engine, unknown()).reason is Reason.UNKNOWN_CREDENTIAL


def test_refused_requests_do_not_extend_the_block(engine: Engine, clock: FakeClock) -> None:
    for _ in range(LIMITS.source_failures):
        check(engine, unknown())
    for _ in range(30):
        clock.advance(2)
        check(engine, unknown())  # refused while blocked, not counted
    clock.advance(2)
    assert check(engine, unknown()).reason is Reason.UNKNOWN_CREDENTIAL


def test_failures_per_key_id_block_that_key_from_any_source(
    engine: Engine, keys: dict[str, str]
) -> None:
    for i in range(LIMITS.key_failures):
        assert check(engine, keys["revoked"], f"10.0.0.{i}").reason is Reason.REVOKED_CREDENTIAL
    assert check(engine, keys["revoked"], "10.0.1.1").reason is Reason.RATE_LIMITED
    assert check(engine, keys["good"], "10.0.1.1").reason is Reason.OK


def test_a_working_key_refused_for_a_workspace_is_not_counted(
    engine: Engine, keys: dict[str, str]
) -> None:
    # A client's bug (asking for a workspace it lacks) must not lock its valid key out.
    headers = {"authorization": f"Bearer {keys['good']}"}
    for _ in range(LIMITS.key_failures + LIMITS.source_failures):
        probe = CheckInput("GET", "/v1/workspaces/globex/checks", "api", headers, {}, "10.1.0.1")
        assert engine.check(probe).reason is Reason.WORKSPACE_MISMATCH
    assert check(engine, keys["good"], "10.1.0.1").reason is Reason.OK


def test_missing_credentials_and_unknown_sources_are_not_counted(engine: Engine) -> None:
    for _ in range(20):
        d = engine.check(CheckInput("GET", "/v1/checks", "api", {}, {}, "203.0.113.7"))
        assert d.reason is Reason.MISSING_CREDENTIAL
        assert check(engine, unknown(), source="").reason is Reason.UNKNOWN_CREDENTIAL
    assert check(engine, unknown()).reason is Reason.UNKNOWN_CREDENTIAL


def test_credential_failures_are_the_401s_with_a_credential() -> None:
    assert Reason.UNKNOWN_CREDENTIAL in CREDENTIAL_FAILURES
    assert Reason.BAD_SIGNATURE in CREDENTIAL_FAILURES
    assert Reason.MISSING_CREDENTIAL not in CREDENTIAL_FAILURES
    assert Reason.INSUFFICIENT_SCOPE not in CREDENTIAL_FAILURES


def test_limits_of_zero_turn_them_off(keys: dict[str, str], clock: FakeClock) -> None:
    limiter = WindowRateLimiter(AbuseLimits(source_failures=0, key_failures=0))
    for _ in range(100):
        limiter.failed("203.0.113.7", "key_x", clock.now())
    assert not limiter.source_blocked("203.0.113.7", clock.now())
    assert not limiter.key_blocked("key_x", clock.now())


def test_tracked_names_are_bounded(clock: FakeClock) -> None:
    limiter = WindowRateLimiter(AbuseLimits(source_failures=2, max_tracked=100))
    for i in range(1000):
        limiter.failed(f"10.{i // 256}.{i % 256}.1", "", clock.now())
    assert len(limiter._tables["source"]) <= 100


def test_names_counted_recently_survive_eviction(clock: FakeClock) -> None:
    limiter = WindowRateLimiter(AbuseLimits(source_failures=3, max_tracked=100))
    now = clock.now()
    limiter.failed("203.0.113.7", "", now)
    for i in range(95):
        limiter.failed(f"10.0.0.{i}", "", now)
    limiter.failed("203.0.113.7", "", now)  # recent again
    for i in range(20):
        limiter.failed(f"10.0.1.{i}", "", now)  # past the bound: the oldest tenth goes
    assert "10.0.0.0" not in limiter._tables["source"]
    limiter.failed("203.0.113.7", "", now)
    assert limiter.source_blocked("203.0.113.7", now)  # its two earlier failures were kept


# -- per-key request rates --------------------------------------------------------------------


def test_a_key_rate_limit_refuses_the_excess_and_recovers(
    engine: Engine, keys: dict[str, str], clock: FakeClock
) -> None:
    reasons = [check(engine, keys["limited"]).reason for _ in range(15)]
    assert reasons == [Reason.OK] * 10 + [Reason.RATE_LIMITED] * 5
    limited = check(engine, keys["limited"])
    assert limited.http_status == 429
    assert limited.identity is not None and limited.identity.id == "key_limited"
    assert check(engine, keys["good"]).reason is Reason.OK  # other keys are not limited
    clock.advance(1.0)
    assert check(engine, keys["limited"]).reason is Reason.OK


def test_rates_parse_and_print() -> None:
    assert parse_rate("100/s") == (100, 1)
    assert parse_rate("6000/m") == (6000, 60)
    assert parse_rate("10/5s") == (10, 5)
    assert parse_rate("1000/h") == (1000, 3600)
    for text in ("100/s", "10/5s", "6000/m", "1/2m", "1000/h"):
        assert format_rate(*parse_rate(text)) == text
    for bad in ("", "100", "0/s", "100/d", "2000000/s", "1/2h", "x/s"):
        with pytest.raises(InvalidArgument):
            parse_rate(bad)
