"""Unknown API keys (well-formed, not in the replica) on the compiled Check path: decided in C,
counted by the failure limiter's own ``failed`` called from C, and answered, counted and
recorded byte for byte as the pure-Python path does — up to the failure that blocks the
source, and after it (the blocked source's checks are answered 429 in C too, before their
credential is read). The pair, corpus helpers and shipped observers of
tests/test_fastcheck_differential.py."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest

from sidecar.authz.policy import parse_policy
from sidecar.authz.policy_source import load_policy
from sidecar.core import keyformat
from sidecar.dataplane.fastcheck import unavailable
from sidecar.ops.denial_log import DenialLog
from sidecar.ratelimit import AbuseLimits
from tests.test_fastcheck_blocked import answer_of, request_for
from tests.test_fastcheck_differential import (
    EXTRA_POLICY,
    HOST,
    SECRETS,
    Shipped,
    Side,
    StepTimer,
    _advance,
    _shipped,
    _side,
    _source,
    pair,
    request_bytes,
    step_timer,
)

pytestmark = pytest.mark.skipif(bool(unavailable()), reason=f"not built: {unavailable()}")
__all__ = ["pair", "step_timer"]  # fixtures, imported to be used here

ATTACKER, VICTIM = "10.66.6.6", "10.1.1.1"
LIMIT = 5  # the pair's source_failures


def _limiters(pair: tuple[Side, Side]) -> list[Any]:
    return [side.engine.limiter for side in pair]


def _same_limits(pair: tuple[Side, Side]) -> None:
    """Both limiters hold the same blocks and the same counts per source and key id."""
    python, compiled = _limiters(pair)
    assert compiled.blocked_tables() == python.blocked_tables()
    now = _now(pair)
    for scope in ("source", "key"):
        counts = [
            {name: c.local.total(now) for name, c in limiter._tables[scope].items()}
            for limiter in (python, compiled)
        ]
        assert counts[0] == counts[1], scope


def _now(pair: tuple[Side, Side]) -> float:
    return pair[0].engine.clock.now()


def _unknown(header: str = "authorization") -> dict[str, str]:
    key = keyformat.mint_key()
    return {header: f"Bearer {key}"} if header == "authorization" else {header: key}


def test_unknown_keys_are_decided_in_c_up_to_the_block_and_refused_after(
    pair: tuple[Side, Side],
) -> None:
    headers = ["authorization", "x-api-key"]
    if "x-key" in pair[0].engine.policy.credential_headers:
        headers = ["x-key", "authorization"]
    for n in range(LIMIT):
        unknown = _unknown(headers[n % 2])
        assert answer_of(pair, request_for(pair, unknown, ATTACKER)) == (
            b"unknown_credential",
            1,
            0,
        )
        _same_limits(pair)
        blocked = [lim.source_blocked(ATTACKER, _now(pair)) for lim in _limiters(pair)]
        assert blocked == [n == LIMIT - 1] * 2  # the fifth failure trips the block, on both
    # Blocked: refused before any key is looked at, in C, counting nothing; a request the C
    # path cannot read that far (no credential, a non-ASCII one) by Python, the same way.
    reader = {"authorization": f"Bearer {SECRETS['reader']}"}
    for header in (_unknown(), reader, {"authorization": "Bearer spk_nope"}):
        assert answer_of(pair, request_for(pair, header, ATTACKER)) == (b"rate_limited", 1, 0)
    for header in ({}, {"authorization": "Bearer spk_é"}):
        assert answer_of(pair, request_for(pair, header, ATTACKER)) == (b"rate_limited", 0, 1)
    _same_limits(pair)
    # The window slides past every failure: unknown keys are the C path's again, counted anew.
    _advance(pair, 61)
    assert answer_of(pair, request_for(pair, _unknown(), ATTACKER)) == (b"unknown_credential", 1, 0)
    _same_limits(pair)


def test_malformed_keys_go_to_python_and_count_toward_the_same_block(
    pair: tuple[Side, Side],
) -> None:
    header = "x-key" if "x-key" in pair[0].engine.policy.credential_headers else "x-api-key"
    minted = keyformat.mint_key()
    malformed = [
        minted[:-1] + ("A" if minted[-1] != "A" else "B"),  # checksum off by one character
        minted[:-1],  # one short
        minted + "A",  # one long
        "spk_" + "-" * 38,  # not base62
    ]
    for key in malformed:
        assert not keyformat.is_well_formed(key)
        reason = answer_of(pair, request_for(pair, {header: key}, ATTACKER))
        assert reason == (b"malformed_credential", 0, 1)
    not_a_key = {header: minted.replace("spk_", "spk-", 1)}
    assert answer_of(pair, request_for(pair, not_a_key, VICTIM)) == (b"malformed_credential", 0, 1)
    _same_limits(pair)
    # Four malformed (Python) and one unknown (C) failures: the fifth trips the block.
    assert not any(lim.source_blocked(ATTACKER, _now(pair)) for lim in _limiters(pair))
    assert answer_of(pair, request_for(pair, _unknown(header), ATTACKER)) == (
        b"unknown_credential", 1, 0,
    )  # fmt: skip
    assert all(lim.source_blocked(ATTACKER, _now(pair)) for lim in _limiters(pair))
    assert answer_of(pair, request_for(pair, _unknown(header), ATTACKER)) == (b"rate_limited", 1, 0)
    _same_limits(pair)


def test_a_spray_from_one_source_blocks_it_and_the_victim_keeps_its_allows_in_c(
    pair: tuple[Side, Side],
) -> None:
    reader = {"authorization": f"Bearer {SECRETS['reader']}"}
    reasons: dict[bytes, int] = {}
    for _ in range(200):
        reason, _, _ = answer_of(pair, request_for(pair, _unknown(), ATTACKER))
        reasons[reason] = reasons.get(reason, 0) + 1
        # The victim tenant, between the attacker's requests: allowed, from C, every time.
        assert answer_of(pair, request_for(pair, reader, VICTIM)) == (b"ok", 1, 0)
    assert reasons == {b"unknown_credential": LIMIT, b"rate_limited": 200 - LIMIT}
    _same_limits(pair)


def test_a_spray_from_many_sources_blocks_each_at_its_own_limit(pair: tuple[Side, Side]) -> None:
    reader = {"authorization": f"Bearer {SECRETS['reader']}"}
    sources = [f"10.77.{n >> 8}.{n & 255}" for n in range(300)]
    for round_ in range(LIMIT + 1):
        for source in sources:
            expected = b"unknown_credential" if round_ < LIMIT else b"rate_limited"
            assert answer_of(pair, request_for(pair, _unknown(), source)) == (expected, 1, 0)
        assert answer_of(pair, request_for(pair, reader, VICTIM)) == (b"ok", 1, 0)
        _same_limits(pair)
    assert set(_limiters(pair)[1].blocked_tables()[0]) == set(sources)
    # An IPv6 client, and a request without a source (never blocked, never counted).
    for source in ("2001:db8::7", ""):
        for _ in range(LIMIT + 1):
            answer_of(pair, request_for(pair, _unknown(), source))
        _same_limits(pair)
    assert answer_of(pair, request_for(pair, _unknown(), ""))[:2] == (b"unknown_credential", 1)


_BASE62 = st.sampled_from(keyformat.ALPHABET)


@st.composite
def _near_keys(draw: st.DrawFn) -> str:
    """Minted keys, some changed: a character replaced, cut or added (checksum or length off)."""
    key = keyformat.mint_key()
    how = draw(st.sampled_from(["as is", "replace", "cut", "add", "other"]))
    at = draw(st.integers(0, len(key) - 1))
    if how == "replace":
        key = key[:at] + draw(_BASE62 | st.sampled_from("-_.~ ")) + key[at + 1 :]
    elif how == "cut":
        key = key[:at] + key[at + 1 :]
    elif how == "add":
        key = key[:at] + draw(_BASE62) + key[at:]
    elif how == "other":
        body = "spk_" + draw(st.text(_BASE62, min_size=32, max_size=32))
        key = body + keyformat.checksum(body)
    return key


@settings(max_examples=300, deadline=None)
@given(key=_near_keys())
def test_the_c_path_decides_exactly_the_well_formed_unknown_keys(key: str) -> None:
    sides = (_side(load_policy(None), False, 3), _side(load_policy(None), True, 3))
    reason, decided, fell_back = answer_of(sides, request_for(sides, {"x-api-key": key}, _source()))
    well_formed = keyformat.is_well_formed(key)
    assert reason == (b"unknown_credential" if well_formed else b"malformed_credential")
    assert (decided, fell_back) == ((1, 0) if well_formed else (0, 1))
    _same_limits(sides)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        skip = set(vars(logging.makeLogRecord({})))
        self.lines.append({k: v for k, v in vars(record).items() if k not in skip or k == "msg"})


class _Tick:
    """The denial logs' token-bucket clock: mocked, one step per read on both sides."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 0.001
        return self.t


@dataclass(frozen=True)
class ShippedPair:
    """The pure-Python and the compiled side with the shipped observers under one policy (the
    default or the extra one), and that policy's credential header, protected path and host;
    ``lines`` catches each side's decision log lines."""

    sides: list[Shipped]
    denials: list[DenialLog]
    header: str
    path: str
    host: str
    lines: list[_Lines] = field(default_factory=lambda: [_Lines(), _Lines()])

    def answer_alike(self, requests: list[bytes]) -> None:
        """Each request answered by both sides, byte for byte the same."""
        for data in requests:
            answers = []
            for side, sink in zip(self.sides, self.lines, strict=True):
                with _catching(sink):
                    answers.append(side.answer(data))
            assert answers[1] == answers[0], data


@contextlib.contextmanager
def _catching(sink: _Lines) -> Iterator[None]:
    """``sink`` catches the decision log's lines (INFO and up) meanwhile."""
    logger = logging.getLogger("sidecar.decisions")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(sink)
    try:
        yield
    finally:
        logger.removeHandler(sink)
        logger.setLevel(level)


def shipped_pair(
    policy_name: str, tmp_path: Path, capacity: int, limits: AbuseLimits
) -> ShippedPair:
    policy = load_policy(None) if policy_name == "default" else parse_policy(EXTRA_POLICY)
    # The denial logs' buckets on a mocked clock: a burst of 50 lines, then suppressed.
    denials = [DenialLog(50.0, clock=_Tick()) for _ in range(2)]
    sides = [
        _shipped(
            policy,
            compiled,
            tmp_path / str(compiled),
            capacity,
            1.0,
            denials=denials[compiled],
            limits=limits,
        )
        for compiled in (False, True)
    ]
    if policy_name == "extra":
        return ShippedPair(sides, denials, "x-key", "/v2/acme/items/7/detail", "api.example")
    return ShippedPair(sides, denials, "x-api-key", "/v1/workspaces/acme/checks", HOST)


@pytest.mark.parametrize("capacity", [100_000, 40])
@pytest.mark.parametrize("policy_name", ["default", "extra"])
def test_unknown_keys_observed_in_c_leave_the_same_records_lines_and_metrics(
    policy_name: str, capacity: int, tmp_path: Path, step_timer: StepTimer
) -> None:
    limits = AbuseLimits(source_failures=LIMIT, key_failures=3)
    shipped = shipped_pair(policy_name, tmp_path, capacity, limits)
    header, path, host = shipped.header, shipped.path, shipped.host
    reader = {"authorization": f"Bearer {SECRETS['reader']}"}
    requests = []
    for n in range(60):
        source = f"10.5.{n % 7}.1"  # seven sources: each is blocked after its fifth failure
        requests.append(request_bytes("GET", path, _unknown(header), host=host, source=source))
        requests.append(request_bytes("GET", path, reader, host=host, source="10.9.0.1"))
    # Credential-shaped paths and sources: the C path hands their observers to Python.
    requests += [
        request_bytes("GET", f"{path}/{keyformat.mint_key()}", _unknown(header), host=host),
        request_bytes("GET", f"{path}/eyJx", _unknown(header), host=host),
        request_bytes("GET", path, _unknown(header), host=host, source="spk_" + "b" * 30),
        request_bytes("GET", path + "?api_key=x", _unknown(header), host=host, source="::1"),
    ]
    shipped.answer_alike(requests)
    lines, sides = shipped.lines, shipped.sides
    for log, sink in zip(shipped.denials, lines, strict=True):
        with _catching(sink):
            assert log.flush(force=True) > 0  # some were suppressed: the summary says how many
    for side in sides:
        side.flush()
    python, compiled = sides
    assert len(lines[0].lines) > 51  # the burst, a few refilled tokens, and the summary
    assert lines[1].lines == lines[0].lines
    assert compiled.payloads == python.payloads
    assert python.pipeline.queue.stats() == compiled.pipeline.queue.stats()
    # A full queue (40): each denial pushed the oldest allow out, on both paths alike.
    assert len(python.payloads) == (len(requests) if capacity > len(requests) else 64)
    text = generate_latest(python.metrics.registry)
    # Seven sources, five failures each before the block, and the four handed over; the rest
    # refused for their blocked source.
    assert re.search(rb'reason="unknown_credential"} 39\.0', text)
    assert re.search(rb'reason="rate_limited"} 25\.0', text)
    assert generate_latest(compiled.metrics.registry) == text
    # Observed in C: the allows, the 35 unknown keys, the 25 refused after their source's block,
    # and the one whose query string the record leaves out; in Python: the three with something
    # credential-shaped in the record's fields.
    assert compiled.handler.observed() == 60 + 35 + 25 + 1  # type: ignore[attr-defined]
    for side in sides:
        side.pipeline.close(0)
