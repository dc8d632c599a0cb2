"""Keys the replica holds but refuses (revoked, suspended, expired — a replaced key past its grace
deadline too) on the compiled Check path: decided in C, counted by the failure limiter's own
``failed`` against the source and the key id, called from C exactly where ``Engine._failed``
calls it, and answered and observed byte for byte as the pure-Python path does — up to the
failure that blocks the key id (then Python answers its 429) and the source (then C answers it,
before the credential is read). A replaced key inside its grace window is still allowed, in C.
The pair, corpus helpers and shipped observers of tests/test_fastcheck_differential.py."""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from sidecar.authz.engine import Engine
from sidecar.authz.policy_source import load_policy
from sidecar.core import keyformat
from sidecar.core.clock import FakeClock
from sidecar.core.models import Change
from sidecar.dataplane.fastcheck import unavailable
from sidecar.ratelimit import AbuseLimits
from tests.test_fastcheck_blocked import answer_of, request_for
from tests.test_fastcheck_differential import (
    HOST,
    NOW,
    SECRETS,
    Side,
    StepTimer,
    _advance,
    _reason,
    _shipped,
    pair,
    request_bytes,
    step_timer,
)
from tests.test_fastcheck_unknown import _limiters, _Lines, _now, _same_limits, shipped_pair

pytestmark = pytest.mark.skipif(bool(unavailable()), reason=f"not built: {unavailable()}")
__all__ = ["pair", "step_timer"]  # fixtures, imported to be used here

ATTACKER, OTHER = "10.66.6.6", "10.2.2.2"
KEY_LIMIT = 3  # the pair's key_failures
REFUSED = {
    "revoked": b"revoked_credential",
    "suspended": b"suspended_credential",
    "expired": b"expired_credential",
}


def _header(pair: tuple[Side, Side], name: str, n: int = 0) -> dict[str, str]:
    headers = ["authorization", "x-api-key"]
    if "x-key" in pair[0].engine.policy.credential_headers:
        headers = ["x-key", "authorization"]
    header = headers[n % 2]
    secret = SECRETS[name]
    return {header: f"Bearer {secret}"} if header == "authorization" else {header: secret}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_a_refused_key_is_decided_in_c_up_to_its_key_block_then_python_answers_429(
    pair: tuple[Side, Side], name: str
) -> None:
    # From three sources: the key id's own count trips its block, no source's does.
    sources = [ATTACKER, OTHER, "2001:db8::7"]
    for n in range(KEY_LIMIT):
        request = request_for(pair, _header(pair, name, n), sources[n])
        assert answer_of(pair, request) == (REFUSED[name], 1, 0)
        _same_limits(pair)
        blocked = [lim.key_blocked(f"key_{name}", _now(pair)) for lim in _limiters(pair)]
        assert blocked == [n == KEY_LIMIT - 1] * 2  # the third failure blocks the key id
    # The key id is blocked: Python answers 429 (detail 'key'), counting nothing.
    for source in sources:
        request = request_for(pair, _header(pair, name), source)
        assert answer_of(pair, request) == (b"rate_limited", 0, 1)
    _same_limits(pair)
    assert not any(lim.source_blocked(ATTACKER, _now(pair)) for lim in _limiters(pair))
    # The window slides past every failure: the key is refused in C again, counted anew.
    _advance(pair, 61)
    assert answer_of(pair, request_for(pair, _header(pair, name), ATTACKER)) == (
        REFUSED[name], 1, 0,
    )  # fmt: skip
    _same_limits(pair)


def test_refused_keys_count_toward_the_source_block_with_unknown_keys(
    pair: tuple[Side, Side],
) -> None:
    # Five failures from one source (source_failures=5), over three key ids and an unknown key:
    # the fifth blocks the source, in C and in Python alike.
    names = ["revoked", "suspended", "expired", "revoked"]
    for name in names:
        assert answer_of(pair, request_for(pair, _header(pair, name), ATTACKER))[:2] == (
            REFUSED[name], 1,
        )  # fmt: skip
        _same_limits(pair)
    unknown = {"authorization": f"Bearer {keyformat.mint_key()}"}
    assert answer_of(pair, request_for(pair, unknown, ATTACKER)) == (b"unknown_credential", 1, 0)
    assert all(lim.source_blocked(ATTACKER, _now(pair)) for lim in _limiters(pair))
    # Blocked: refused in C before the key is read, its key id not counted.
    assert answer_of(pair, request_for(pair, _header(pair, "expired"), ATTACKER)) == (
        b"rate_limited", 1, 0,
    )  # fmt: skip
    _same_limits(pair)


def _replaced(pair: tuple[Side, Side], grace_deadline: int) -> str:
    """A key replaced with a grace deadline (the replica ends it there, like an expiry)."""
    return _replaced_in([side.engine for side in pair], grace_deadline)


def _replaced_in(engines: list[Engine], grace_deadline: int) -> str:
    secret = keyformat.mint_key()
    payload = {
        "id": "key_replaced",
        "digest": hashlib.sha256(secret.encode()).hexdigest(),
        "workspace": "acme",
        "scopes": ["checks:read"],
        "expires_at": 4_000_000_000,
        "grace_deadline": grace_deadline,
    }
    for engine in engines:
        revision = engine.replica.revision + 1
        engine.replica.apply(Change("credential.upserted", "key_replaced", payload, revision))
    return secret


def test_a_replaced_key_is_allowed_in_its_grace_window_and_expired_after_it(
    pair: tuple[Side, Side],
) -> None:
    secret = _replaced(pair, int(NOW) + 30)
    header = "x-key" if "x-key" in pair[0].engine.policy.credential_headers else "x-api-key"
    request = request_for(pair, {header: secret}, ATTACKER)
    for _ in range(KEY_LIMIT + 2):  # allows count nothing
        assert answer_of(pair, request) == (b"ok", 1, 0)
    _advance(pair, 29.5)
    assert answer_of(pair, request) == (b"ok", 1, 0)
    _advance(pair, 0.5)  # at the deadline: expired, as Engine._api_key's ``<=`` says
    assert answer_of(pair, request) == (b"expired_credential", 1, 0)
    _same_limits(pair)
    assert answer_of(pair, request) == (b"expired_credential", 1, 0)
    assert answer_of(pair, request) == (b"expired_credential", 1, 0)
    assert all(lim.key_blocked("key_replaced", _now(pair)) for lim in _limiters(pair))
    assert answer_of(pair, request) == (b"rate_limited", 0, 1)
    _same_limits(pair)


@pytest.mark.parametrize("capacity", [100_000, 40])
@pytest.mark.parametrize("policy_name", ["default", "extra"])
def test_refused_keys_decided_in_c_leave_the_same_records_lines_and_metrics(
    policy_name: str, capacity: int, tmp_path: Path, step_timer: StepTimer
) -> None:
    limits = AbuseLimits(source_failures=100, key_failures=KEY_LIMIT)
    shipped = shipped_pair(policy_name, tmp_path, capacity, limits)
    header, path, host = shipped.header, shipped.path, shipped.host
    reader = {"authorization": f"Bearer {SECRETS['reader']}"}
    requests = []
    for n in range(30):
        name = sorted(REFUSED)[n % 3]
        source = f"10.5.{n % 7}.1"
        requests.append(
            request_bytes("GET", path, {header: SECRETS[name]}, host=host, source=source)
        )
        requests.append(request_bytes("GET", path, reader, host=host, source="10.9.0.1"))
    shipped.answer_alike(requests)
    lines, sides = shipped.lines, shipped.sides
    for side in sides:
        side.flush()
    python, compiled = sides
    assert lines[1].lines == lines[0].lines
    assert len(lines[0].lines) == 30
    assert compiled.payloads == python.payloads
    assert python.pipeline.queue.stats() == compiled.pipeline.queue.stats()
    text = generate_latest(python.metrics.registry)
    # Each key id: three failures, then its block's 429s (answered by Python).
    for reason in REFUSED.values():
        assert re.search(rb'reason="' + reason + rb'"} 3\.0', text)
    assert re.search(rb'reason="rate_limited"} 21\.0', text)
    assert generate_latest(compiled.metrics.registry) == text
    decided, fell_back = compiled.handler.counts()  # type: ignore[attr-defined]
    # The allows and the nine refused keys in C; the 21 blocked key ids in Python.
    assert (decided, fell_back) == (30 + 9, 21)
    # Observed in C too: the allows and the refused keys (metrics slot, record, denial line).
    assert compiled.handler.observed() == 30 + 9  # type: ignore[attr-defined]
    for side in sides:
        side.pipeline.close(0)


def test_a_replaced_key_observed_in_c_allows_then_expires_with_its_own_records(
    tmp_path: Path, step_timer: StepTimer
) -> None:
    """One identity allowed, then refused at its grace deadline: the C path caches its record
    part per reason, so the expired checks' records and lines name expired_credential."""
    limits = AbuseLimits(source_failures=100, key_failures=KEY_LIMIT)
    sides = [
        _shipped(load_policy(None), compiled, tmp_path / str(compiled), 100, 1.0, limits=limits)
        for compiled in (False, True)
    ]
    engines = [side.engine for side in sides]
    secret = _replaced_in([e for e in engines if e is not None], int(NOW) + 10)
    data = request_bytes("GET", "/v1/workspaces/acme/checks", {"x-api-key": secret}, host=HOST)
    lines = [_Lines(), _Lines()]
    logger = logging.getLogger("sidecar.decisions")
    level = logger.level
    logger.setLevel(logging.INFO)
    reasons = []
    try:
        for step in range(8):
            if step == 3:
                for engine in engines:
                    assert engine is not None and isinstance(engine.clock, FakeClock)
                    engine.clock.advance(10)
            answers = []
            for side, sink in zip(sides, lines, strict=True):
                logger.addHandler(sink)
                answers.append(side.answer(data))
                logger.removeHandler(sink)
            assert answers[1] == answers[0]
            reasons.append(_reason(answers[0]))
    finally:
        logger.setLevel(level)
    assert reasons == [b"ok"] * 3 + [b"expired_credential"] * 3 + [b"rate_limited"] * 2
    for side in sides:
        side.flush()
    python, compiled = sides
    assert compiled.payloads == python.payloads and len(python.payloads) == 8
    assert lines[1].lines == lines[0].lines and len(lines[0].lines) == 5
    assert generate_latest(compiled.metrics.registry) == generate_latest(python.metrics.registry)
    assert compiled.handler.observed() == 6  # type: ignore[attr-defined]
    for side in sides:
        side.pipeline.close(0)
