"""Decision ids: time-ordered (``dec_`` + 12 hex digits of Unix milliseconds) and unguessable
(+ 96 random bits), the same text from ``DecisionIds`` and from the compiled Check path, whose
buffered random bytes a forked child never reuses. That no id predicts another is
tests/test_adversarial_audit.py::test_decision_ids_are_96_random_bits_without_a_counter."""

from __future__ import annotations

import os
import re
import time

import pytest

from sidecar.auditship.records import decision_event
from sidecar.authz.decision import DECISION_ID_LENGTH, DecisionIds
from sidecar.core.audit import AuditEvent
from sidecar.core.audit_batch import RefusalReason
from sidecar.core.audit_trail import SIDECAR, AuditTrail
from sidecar.core.clock import FakeClock, SystemClock
from sidecar.core.models import Principal, RequestContext
from sidecar.core.storage import Store
from sidecar.dataplane.fastcheck import unavailable

ID = re.compile(r"dec_([0-9a-f]{12})([0-9a-f]{24})")
built = pytest.mark.skipif(bool(unavailable()), reason=f"not built: {unavailable()}")


def _ms(decision_id: str) -> int:
    match = ID.fullmatch(decision_id)
    assert match, decision_id
    return int(match[1], 16)


def _random_part(decision_id: str) -> str:
    match = ID.fullmatch(decision_id)
    assert match, decision_id
    return match[2]


def test_an_id_is_the_time_in_milliseconds_then_the_random_bytes() -> None:
    clock = FakeClock(1_800_000_000.1239)
    ids = DecisionIds(lambda n: bytes(range(0xA0, 0xA0 + n)), clock)
    assert ids.next() == "dec_" + "01a3185c507b" + bytes(range(0xA0, 0xAC)).hex()
    assert _ms(ids.next()) == 1_800_000_000_123 and DECISION_ID_LENGTH == 40


def test_text_order_is_time_order_across_digit_carries() -> None:
    clock = FakeClock(0xFFF / 1000 + 0.0005)  # the millisecond before a carry into a fourth digit
    ids = DecisionIds(os.urandom, clock)
    made = []
    for step in (0.0, 0.001, 0.001, 0.25, 86_400.0, 1_000_000.0):
        clock.advance(step)
        made.append(ids.next())
    assert sorted(made) == made
    assert [_ms(i) for i in made] == sorted(_ms(i) for i in made)
    assert all(len(i) == DECISION_ID_LENGTH for i in made)


def test_only_the_system_sources_let_the_compiled_path_make_ids() -> None:
    assert DecisionIds().uses_system_sources()
    assert DecisionIds(os.urandom, SystemClock()).uses_system_sources()
    assert not DecisionIds(os.urandom, FakeClock()).uses_system_sources()
    assert not DecisionIds(lambda n: bytes(n)).uses_system_sources()


@built
def test_the_compiled_path_makes_the_same_format_from_the_system_clock() -> None:
    from sidecar.dataplane import _fastcheck

    before = int(time.time() * 1000)
    made = [_fastcheck.decision_id() for _ in range(1000)]  # ~3 refills of its buffer
    after = int(time.time() * 1000)
    assert all(type(i) is str and len(i) == DECISION_ID_LENGTH for i in made)
    assert all(before <= _ms(i) <= after for i in made)
    assert [_ms(i) for i in made] == sorted(_ms(i) for i in made)
    assert len({_random_part(i) for i in made}) == 1000
    python = DecisionIds().next()
    assert ID.fullmatch(python) and abs(_ms(python) - _ms(made[-1])) < 60_000


@built
def test_a_forked_child_never_hands_out_the_parents_buffered_bytes() -> None:
    """The compiled path buffers getrandom(2) bytes; a child forked (``--workers``) with a
    half-used buffer must draw its own, or parent and child would issue the same ids."""
    from sidecar.dataplane import _fastcheck

    _fastcheck.decision_id()  # the buffer now holds unused bytes, which the fork copies
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report 100 ids and leave without running the parent's cleanup
        try:
            os.close(read)
            os.write(write, " ".join(_fastcheck.decision_id() for _ in range(100)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        child = pipe.read().decode().split()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    parent = [_fastcheck.decision_id() for _ in range(100)]
    assert len(child) == 100 and all(ID.fullmatch(i) for i in child)
    assert not {_random_part(i) for i in child} & {_random_part(i) for i in parent}


def test_the_ingest_bench_sends_ids_a_sidecar_makes() -> None:
    """``bench.ingest`` makes its ids with ``DecisionIds`` at each record's time, so its number
    is for the ids a sidecar sends; ``random`` keeps the former format for a before/after."""
    from bench.ingest import records
    from sidecar.auditship.codec import decode

    now = 1_800_000_000.0
    made = [decode(p) for p in records(300, 0, now)]
    assert [_ms(e.id) for e in made] == [int(e.time * 1000) for e in made]
    assert len({_random_part(e.id) for e in made}) == 300
    assert [e.id[:16] for e in made] == sorted(e.id[:16] for e in made)
    former = [decode(p).id for p in records(300, 0, now, ids="random")]
    assert all(re.fullmatch(r"dec_[0-9a-f]{24}", i) for i in former)
    assert former != sorted(former)


def _record(decision_id: str, when: float, path: str = "/v1/workspaces/acme/checks") -> AuditEvent:
    return decision_event(
        time=when,
        allowed=True,
        reason="ok",
        credential_id="key_0000000000000001",
        workspace="acme",
        method="GET",
        path=path,
        source="10.0.0.1:40000",
        decision_id=decision_id,
        latency_s=0.0001,
    )


def test_ids_stored_in_the_former_format_keep_working(store: Store, clock: FakeClock) -> None:
    """A store holding random ids (``dec_`` + 24 hex, before 2026-12-07) takes time-ordered
    ones after them: a re-send of either is acknowledged once stored, other content under
    either id is a conflict, and both are found by id; the chain verifies across them."""
    trail = AuditTrail(store, clock, b"checkpoint-key-for-tests-32bytes")
    shipper = RequestContext(SIDECAR, "req_sidecar")
    now = clock.now()
    former = [_record("dec_" + os.urandom(12).hex(), now - 2 + i * 1e-3) for i in range(3)]
    ids = DecisionIds(os.urandom, clock)
    new = [_record(ids.next(), now - 1 + i * 1e-3) for i in range(3)]
    assert trail.ingest(shipper, former).stored == 3 and trail.ingest(shipper, new).stored == 3
    again = trail.ingest(shipper, [former[1], new[1]])
    assert again.acknowledged == [former[1].id, new[1].id] and again.stored == 0
    forged = [_record(e.id, e.time, "/v1/workspaces/acme/keys") for e in (former[0], new[0])]
    refused = trail.ingest(shipper, forged).refused
    assert [(r.id, r.reason) for r in refused] == [(e.id, RefusalReason.CONFLICT) for e in forged]
    with store.read() as uow:
        found = uow.audit.get_many([e.id for e in former + new])
        assert uow.audit.get(former[2].id) is not None
    assert sorted(found) == sorted(e.id for e in former + new)
    assert all(found[e.id].target == e.target for e in former + new)
    operator = RequestContext(Principal("key_op", "*", frozenset({"admin:full"})), "req_op")
    assert [r.records_checked for r in trail.verify(operator) if r.ok] == [6]
