"""Batched decision-record ingest over each real backend (a SQLite file, a PostgreSQL database):
a batch mixing workspaces links each chain in order, a refused record leaves the rest of its batch
stored, a duplicate inside one batch is stored once, a fault mid-batch commits and acknowledges
nothing, and every chain verifies afterwards. Then the same through the real gRPC ingest and the
sidecar's shipper; and the canonical form written out by hand against its json.dumps definition."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.auditship import GrpcTransport, Shipper, Spool, TransportError
from sidecar.auditship.codec import decode, encode, ingest_request
from sidecar.auditship.records import decision_event
from sidecar.auditship.shipper import DEAD_LETTER_FILE
from sidecar.auditship.spool import parse_frames
from sidecar.core import audit_native
from sidecar.core.audit import _SECRET, AuditEvent, event, secret_in
from sidecar.core.audit_batch import EventBatch, RefusalReason
from sidecar.core.audit_chain import GENESIS, canonical, canonical_reference
from sidecar.core.audit_trail import NO_WORKSPACE, SIDECAR, AuditTrail
from sidecar.core.clock import FakeClock
from sidecar.core.models import Principal, RequestContext
from sidecar.core.storage import IdAlreadyStored, Store
from sidecar.store.sql.postgres import PostgresStore
from sidecar.store.sql.sqlite import SqliteStore
from tests.conftest import RunningControlPlane
from tests.support.postgres import postgres_available
from tests.support.rawsql import raw
from tests.support.sync import TEST_SYNC_TOKEN

KEY = b"checkpoint-key-for-tests-32bytes"
SHIPPER = RequestContext(SIDECAR, "req_sidecar")
OPERATOR = RequestContext(Principal("key_op", "*", frozenset({"admin:full"})), "req_op")
WORKSPACES = ("acme", "globex", "initech", "")


def record(n: int, workspace: str, when: float, *, allowed: bool = True) -> AuditEvent:
    return decision_event(
        time=when,
        allowed=allowed,
        reason="ok" if allowed else "insufficient_scope",
        credential_id=f"key_{n % 7:016d}",
        workspace=workspace,
        method="GET",
        path=f"/v1/workspaces/{workspace or 'x'}/checks/{n}",
        source=f"10.0.0.{n % 250}:4{n % 10000:04d}",
        decision_id=f"dec_{n:024x}",
        latency_s=0.0001,
    )


def mixed(clock: FakeClock, start: int, count: int) -> list[AuditEvent]:
    now = clock.now()
    return [
        record(i, WORKSPACES[i % len(WORKSPACES)], now - 10 + i * 1e-3, allowed=i % 3 != 0)
        for i in range(start, start + count)
    ]


def chains(store: Store) -> dict[str, list[tuple[str, int, str, str]]]:
    """Each workspace's (id, chain_seq, prev_digest, digest) in storage order."""
    with raw(store) as conn:
        rows = conn.execute(
            "SELECT workspace, id, chain_seq, prev_digest, digest FROM audit_events ORDER BY seq"
        ).fetchall()
    out: dict[str, list[tuple[str, int, str, str]]] = {}
    for ws, eid, seq, prev, dig in rows:
        out.setdefault(str(ws), []).append((str(eid), int(seq), str(prev), str(dig)))
    return out


def all_verify(trail: AuditTrail) -> dict[str, int]:
    reports = trail.verify(OPERATOR)
    assert [r.first_break for r in reports if not r.ok] == []
    return {r.workspace: r.records_checked for r in reports}


# -- the store, both backends -----------------------------------------------------------------


def test_a_batch_mixing_workspaces_links_each_chain_in_order(
    store: Store, clock: FakeClock
) -> None:
    trail = AuditTrail(store, clock, KEY)
    first = mixed(clock, 0, 500)
    # A key event between two batches joins the same chain the batches extend.
    with store.transaction() as uow:
        uow.audit.append(event(clock.now() - 20, "key_op", "key.created", "acme", "key_x"))
    second = mixed(clock, 500, 700)
    results = [trail.ingest(SHIPPER, first), trail.ingest(SHIPPER, second[:500])]
    results.append(trail.ingest(SHIPPER, second[500:]))
    assert [r.stored for r in results] == [500, 500, 200] and not any(r.refused for r in results)
    assert [i for r in results for i in r.acknowledged] == [e.id for e in first + second]
    linked = chains(store)
    assert set(linked) == {"acme", "globex", "initech", NO_WORKSPACE}
    for rows in linked.values():
        assert [seq for _, seq, _, _ in rows] == list(range(1, len(rows) + 1))
        assert rows[0][2] == GENESIS
        assert all(rows[i][2] == rows[i - 1][3] for i in range(1, len(rows)))
    # Each chain holds its own workspace's records, in the order they were sent.
    sent = [e for e in first + second if e.workspace == "globex"]
    assert [eid for eid, _, _, _ in linked["globex"]] == [e.id for e in sent]
    assert all_verify(trail) == {"-": 300, "acme": 301, "globex": 300, "initech": 300}


def test_a_refused_record_leaves_the_rest_of_its_batch_stored(
    store: Store, clock: FakeClock
) -> None:
    trail = AuditTrail(store, clock, KEY)
    good = mixed(clock, 0, 6)
    future = record(100, "acme", clock.now() + 3600)
    forged = event(clock.now(), "key_a", "key.revoked", "acme", "key_b")
    bad_ws = record(101, "Not A Workspace", clock.now())
    batch = [good[0], future, good[1], good[2], forged, good[3], bad_ws, good[4], good[5]]
    result = trail.ingest(SHIPPER, batch)
    assert result.acknowledged == [e.id for e in good] and result.stored == 6
    assert [(r.id, r.field) for r in result.refused] == [
        (future.id, "records.time"),
        (forged.id, "records.action"),
        (bad_ws.id, "records.workspace"),
    ]
    assert "future" in result.refused[0].message
    stored = {eid for rows in chains(store).values() for eid, _, _, _ in rows}
    assert stored == {e.id for e in good}
    # Refused means never stored: a corrected re-send is a new record, not a duplicate.
    assert trail.ingest(SHIPPER, [record(100, "acme", clock.now())]).stored == 1
    all_verify(trail)


def test_a_nul_character_is_refused_alone_on_both_backends(store: Store, clock: FakeClock) -> None:
    """PostgreSQL's text cannot hold U+0000, and a direct caller of Check controls the method,
    path and source its record names: stored as is, one such record failed its whole message
    (INTERNAL) on every retry, holding back every record the sidecar shipped after it."""
    trail = AuditTrail(store, clock, KEY)
    good = mixed(clock, 0, 4)
    now = clock.now()
    in_path = record(200, "acme", now)._replace(target="/v1/\x00/checks")
    in_meta = record(201, "acme", now)
    in_meta = in_meta._replace(metadata={**in_meta.metadata, "method": "G\x00ET"})
    in_actor = record(202, "globex", now)._replace(actor="key_\x00")
    batch = [good[0], in_path, good[1], in_meta, good[2], in_actor, good[3]]
    # The compiled step declines a message holding NUL, so the Python checks name each one.
    assert audit_native.parse(ingest_request([encode(e) for e in batch]), now + 60) is None
    result = trail.ingest(SHIPPER, batch)
    assert result.acknowledged == [e.id for e in good] and result.stored == 4
    assert [(r.index, r.reason) for r in result.refused] == [
        (1, RefusalReason.NUL_CHARACTER),
        (3, RefusalReason.NUL_CHARACTER),
        (5, RefusalReason.NUL_CHARACTER),
    ]
    assert all("\x00" not in r.message for r in result.refused)
    all_verify(trail)


def test_a_duplicate_within_one_batch_is_stored_once(store: Store, clock: FakeClock) -> None:
    trail = AuditTrail(store, clock, KEY)
    a, b = mixed(clock, 0, 2)
    other = record(0, "globex", a.time)  # a's id, another workspace's content
    assert other.id == a.id and other != a
    result = trail.ingest(SHIPPER, [a, b, a, other, a])
    # Each copy of a is acknowledged (the shipper counts one per record sent); other is not.
    assert result.acknowledged == [a.id, b.id, a.id, a.id] and result.stored == 2
    assert [(r.id, r.field) for r in result.refused] == [(a.id, "records.id")]
    assert trail.conflicts == 1
    assert {w: [e for e, _, _, _ in rows] for w, rows in chains(store).items()} == {
        a.workspace or NO_WORKSPACE: [a.id],
        b.workspace or NO_WORKSPACE: [b.id],
    }
    # Against what is stored: the same again is a re-send, different content a conflict, and
    # the good records around the conflict are stored.
    c = mixed(clock, 2, 1)[0]
    again = trail.ingest(SHIPPER, [a, other, c])
    assert again.acknowledged == [a.id, c.id] and again.stored == 1 and trail.conflicts == 2
    all_verify(trail)


def test_batches_stored_together_see_the_ones_before_them(store: Store, clock: FakeClock) -> None:
    """``ingest_batches`` (a call's messages, one transaction) answers each batch as separate
    calls would: a later batch's re-send of an earlier one's record is acknowledged, other
    content under its id refused, and each chain links across the batches."""
    trail = AuditTrail(store, clock, KEY)
    latest = trail.latest_record_time()
    first, second = mixed(clock, 0, 6), mixed(clock, 6, 4)
    other = record(0, "globex", first[0].time)  # first[0]'s id, other content
    batches = [
        EventBatch(first, latest),
        EventBatch([*second, first[1], other], latest),
    ]
    one, two = trail.ingest_batches(SHIPPER, batches)
    assert one.acknowledged == [e.id for e in first] and one.stored == 6 and one.refused == []
    assert two.acknowledged == [*(e.id for e in second), first[1].id] and two.stored == 4
    assert [(r.id, r.index, r.reason) for r in two.refused] == [
        (other.id, 5, RefusalReason.CONFLICT)
    ]
    assert one.cursor == two.cursor and trail.conflicts == 1
    assert [e for e, _, _, _ in chains(store)["acme"]] == [
        e.id for e in [*first, *second] if e.workspace == "acme"
    ]
    assert sum(all_verify(trail).values()) == 10


def test_a_stored_id_late_in_a_call_stores_the_call_again_with_the_lookup(
    store: Store, clock: FakeClock
) -> None:
    """Ingest inserts a call's records without looking their ids up; the id index refuses a
    stored one, which voids the transaction, and the call is stored again with the lookup. The
    answer is the lookup's: re-sends acknowledged, a conflict refused and counted once, and
    nothing of the first attempt left behind (no row twice, chains without a gap)."""
    trail = AuditTrail(store, clock, KEY)
    earlier = mixed(clock, 0, 30)
    trail.ingest(SHIPPER, earlier)
    latest = trail.latest_record_time()
    one, two, three = mixed(clock, 30, 500), mixed(clock, 530, 500), mixed(clock, 1030, 20)
    other = record(3, "globex", earlier[3].time)  # earlier[3]'s id, other content
    assert other.id == earlier[3].id and other != earlier[3]
    resent = [*three[:10], earlier[7], other, *three[10:], earlier[20]]
    results = trail.ingest_batches(
        SHIPPER,
        [EventBatch(one, latest), EventBatch(two, latest), EventBatch(resent, latest)],
    )
    assert [r.stored for r in results] == [500, 500, 20] and trail.conflicts == 1
    assert results[2].acknowledged == [
        *(e.id for e in three[:10]),
        earlier[7].id,
        *(e.id for e in three[10:]),
        earlier[20].id,
    ]
    assert [(r.id, r.index, r.reason) for r in results[2].refused] == [
        (other.id, 11, RefusalReason.CONFLICT)
    ]
    with raw(store) as conn:
        stored = [str(r[0]) for r in conn.execute("SELECT id FROM audit_events ORDER BY seq")]
    assert stored == [e.id for e in [*earlier, *one, *two, *three]]
    assert sum(all_verify(trail).values()) == 1050


def test_a_call_of_new_records_looks_no_id_up(tmp_path: Path, clock: FakeClock) -> None:
    """The steady state (nothing re-sent) costs no id lookup: the id index's own check finds a
    stored id (above). SQLite's statements, traced on the store's connection."""
    store = SqliteStore(tmp_path / "trail.db")
    trail = AuditTrail(store, clock, KEY)
    trail.ingest(SHIPPER, mixed(clock, 0, 10))
    statements: list[str] = []
    store._connect().set_trace_callback(statements.append)
    latest = trail.latest_record_time()
    sent = mixed(clock, 10, 600)
    trail.ingest_batches(SHIPPER, [EventBatch(sent[:500], latest), EventBatch(sent[500:], latest)])
    inserts = [s for s in statements if s.startswith("INSERT OR ROLLBACK INTO audit_events")]
    assert len(inserts) == 2 + 4  # 250, 250; then 100: 25 x 4
    assert not [s for s in statements if "WHERE id IN" in s]
    trail.ingest(SHIPPER, sent[:3])  # a re-send: looked up in the second attempt
    assert [s for s in statements if "WHERE id IN" in s]
    store.close()


def _fail_inserts_of(store: Store, event_id: str) -> None:
    """A real database fault on one row's INSERT (a trigger raising), as a full disk or a lost
    connection would fail a statement halfway through a batch."""
    with raw(store) as conn:
        if isinstance(store, PostgresStore):
            conn.execute(
                "CREATE FUNCTION fail_insert() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'injected fault'; END $$"
            )
            conn.execute(
                "CREATE TRIGGER fail_insert BEFORE INSERT ON audit_events FOR EACH ROW "
                f"WHEN (NEW.id = '{event_id}') EXECUTE FUNCTION fail_insert()"
            )
        else:
            conn.execute(
                "CREATE TRIGGER fail_insert BEFORE INSERT ON audit_events "
                f"WHEN NEW.id = '{event_id}' BEGIN SELECT RAISE(ABORT, 'injected fault'); END"
            )


def _heal(store: Store) -> None:
    on = " ON audit_events" if isinstance(store, PostgresStore) else ""
    with raw(store) as conn:
        conn.execute(f"DROP TRIGGER fail_insert{on}")


def test_a_fault_mid_batch_stores_and_acknowledges_nothing_of_it(
    store: Store, clock: FakeClock
) -> None:
    trail = AuditTrail(store, clock, KEY)
    before = mixed(clock, 0, 8)
    trail.ingest(SHIPPER, before)
    heads = {w: rows[-1] for w, rows in chains(store).items()}
    batch = mixed(clock, 8, 40)
    _fail_inserts_of(store, batch[25].id)
    with pytest.raises(Exception, match="injected fault"):
        trail.ingest(SHIPPER, batch)  # no result: no id of the batch is acknowledged
    assert {w: rows[-1] for w, rows in chains(store).items()} == heads  # rolled back whole
    _heal(store)
    result = trail.ingest(SHIPPER, batch)  # the shipper's re-send
    assert result.stored == 40 and result.acknowledged == [e.id for e in batch]
    assert sum(all_verify(trail).values()) == 48


def test_a_fault_inside_a_multi_row_insert_rolls_back_the_whole_call(
    store: Store, clock: FakeClock
) -> None:
    """SQLite inserts a message's rows 250 to a statement, without a statement journal (``INSERT
    OR ROLLBACK``): a fault in the middle of such a statement, in a call's second message, still
    leaves nothing of the call, and the re-send stores it whole, in order."""
    trail = AuditTrail(store, clock, KEY)
    trail.ingest(SHIPPER, mixed(clock, 0, 8))
    heads = {w: rows[-1] for w, rows in chains(store).items()}
    sent = mixed(clock, 8, 1000)
    latest = trail.latest_record_time()
    _fail_inserts_of(store, sent[500 + 130].id)  # inside the second message's first 250
    with pytest.raises(Exception, match="injected fault"):
        trail.ingest_batches(
            SHIPPER, [EventBatch(sent[:500], latest), EventBatch(sent[500:], latest)]
        )
    assert {w: rows[-1] for w, rows in chains(store).items()} == heads
    _heal(store)
    results = trail.ingest_batches(
        SHIPPER, [EventBatch(sent[:500], latest), EventBatch(sent[500:], latest)]
    )
    assert [r.stored for r in results] == [500, 500]
    with raw(store) as conn:
        stored = [str(r[0]) for r in conn.execute("SELECT id FROM audit_events ORDER BY seq")]
    assert stored[8:] == [e.id for e in sent]  # storage order is the order sent
    assert sum(all_verify(trail).values()) == 1008


@pytest.mark.parametrize("count", [0, 1, 499, 500, 501, 1000, 1001])
def test_looking_up_ids_finds_exactly_the_stored_ones_at_any_count(
    store: Store, clock: FakeClock, count: int
) -> None:
    """SQLite looks ids up 500 to a statement, the last padded with NULL: every count around
    that length finds each stored id once, and no absent one (PostgreSQL: one JSON array)."""
    trail = AuditTrail(store, clock, KEY)
    stored = mixed(clock, 0, 1200)
    trail.ingest_batches(
        SHIPPER,
        [EventBatch(stored[:600], clock.now() + 60), EventBatch(stored[600:], clock.now() + 60)],
    )
    wanted = [e.id if i % 3 else f"dec_absent_{i}" for i, e in enumerate(stored[:count])]
    with store.read() as uow:
        found = uow.audit.get_many(wanted)
    assert sorted(found) == sorted(i for i in wanted if not i.startswith("dec_absent"))
    assert all(found[e.id].target == e.target for e in stored[:count] if e.id in found)


def _key_event_then(store: Store, first: AuditEvent, events: list[AuditEvent]) -> None:
    with store.transaction() as uow:
        uow.audit.append(first)
        uow.audit.append_new(events)


@pytest.mark.parametrize("count", [300, 260, 7])  # 250-row statements, 25-row ones, one by one
def test_a_constraint_failing_mid_insert_rolls_back_the_whole_transaction(
    store: Store, clock: FakeClock, count: int
) -> None:
    """A row the table refuses (here an id twice in one insert) fails the transaction it is in,
    with the change before it in that transaction, and the store takes the next transaction as
    if nothing happened. A stored id is reported as such (ingest then stores its call again,
    looking ids up)."""
    trail = AuditTrail(store, clock, KEY)
    trail.ingest(SHIPPER, mixed(clock, 0, 4))
    before = chains(store)
    events = [e._replace(workspace=e.workspace or NO_WORKSPACE) for e in mixed(clock, 4, count)]
    events[count - 3] = events[count - 3]._replace(id=events[2].id)
    with pytest.raises(IdAlreadyStored):
        _key_event_then(store, event(clock.now(), "key_op", "key.created", "acme", "key_x"), events)
    assert chains(store) == before
    assert trail.ingest(SHIPPER, mixed(clock, 4, count)).stored == count
    assert sum(all_verify(trail).values()) == 4 + count


def test_records_stored_before_batching_still_verify(store: Store, clock: FakeClock) -> None:
    """Rows written by the earlier code (metadata with json.dumps' default separators, digest
    from the dict-through-json.dumps definition) verify beside batched ones."""
    trail = AuditTrail(store, clock, KEY)
    old = record(1, "acme", clock.now() - 5)
    dig = hashlib.sha256(canonical_reference(old, 1, GENESIS)).hexdigest()
    with raw(store) as conn:
        conn.execute(
            "INSERT INTO audit_events (id, time, actor, action, workspace, target, outcome, "
            "reason, request_id, metadata, chain_seq, prev_digest, digest) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (old.id, old.time, old.actor, old.action, old.workspace, old.target, old.outcome,
             old.reason, old.request_id, json.dumps(old.metadata, sort_keys=True), 1, GENESIS,
             dig),
        )  # fmt: skip
    assert trail.ingest(SHIPPER, [old, *mixed(clock, 10, 20)]).stored == 20  # old: a re-send
    assert all_verify(trail)["acme"] == 6


# -- the canonical form ----------------------------------------------------------------------

_TEXT = st.text(max_size=40)


@settings(deadline=None)  # a loaded CI box, not the property, sets the pace
@given(
    fields=st.lists(_TEXT, min_size=8, max_size=8),
    metadata=st.dictionaries(_TEXT, _TEXT, max_size=6),
    when=st.floats(min_value=0, max_value=4e9, allow_nan=False),
    chain_seq=st.integers(min_value=0, max_value=2**62),
)
def test_the_written_out_canonical_form_is_the_json_definition(
    fields: list[str], metadata: dict[str, str], when: float, chain_seq: int
) -> None:
    eid, actor, action, workspace, target, outcome, reason, rid = fields
    ev = AuditEvent(eid, when, actor, action, workspace, target, outcome, reason, rid, metadata)
    assert canonical(ev, chain_seq, "ab" * 32) == canonical_reference(ev, chain_seq, "ab" * 32)


def test_metadata_that_is_not_all_strings_takes_the_definition() -> None:
    ev = AuditEvent("e", 1.0, "a", "x", "w", "t", metadata={"n": 1, "s": "é"})  # type: ignore[dict-item]
    assert canonical(ev, 1, GENESIS) == canonical_reference(ev, 1, GENESIS)


_PIECES = st.sampled_from(
    ["sp", "spk_", "spab_", "spabc_", "A1b2C3d4E5f6G7h8I9j0K1l2", "abcd", "_", "a", "Z", "0",
     "9", "eyJ", ".", "-", " ", "\n", "/", "Bearer ", "bEaReR", "BEARER\t", "é", "İ",
     "workspaces"]
)  # fmt: skip


@settings(deadline=None, max_examples=500)
@given(st.lists(_PIECES | st.text(max_size=3), max_size=40).map("".join))
def test_the_secret_shortcut_agrees_with_the_regex(text: str) -> None:
    """``secret_in`` skips the regex when a substring search proves it cannot match: it must
    never skip a match (a credential would reach the trail)."""
    assert secret_in(text) == (_SECRET.search(text) is not None)


def test_the_secret_shortcut_still_finds_each_kind() -> None:
    for secret in ("x spk_" + "a" * 24, "eyJabcd.efgh.ij", "bEaReR tok"):
        assert secret_in(f"/v1/workspaces/acme/{secret}")


# -- through gRPC and the shipper --------------------------------------------------------------


def test_over_grpc_the_good_records_are_stored_and_exactly_the_bad_one_dead_lettered(
    control_plane: RunningControlPlane, tmp_path: Path
) -> None:
    plane, clock = control_plane.plane, control_plane.clock
    good = mixed(clock, 0, 30)
    future = record(999, "acme", clock.now() + 86400)
    payloads = [encode(e) for e in good[:12]] + [encode(future)] + [encode(e) for e in good[12:]]
    transport = GrpcTransport(control_plane.address, TEST_SYNC_TOKEN, timeout=10)
    with pytest.raises(TransportError, match=f"1 refused, the rest stored: '{future.id}'") as info:
        transport.send(payloads)
    assert info.value.rejected
    with plane.store.read() as uow:
        assert set(uow.audit.get_many([e.id for e in [*good, future]])) == {e.id for e in good}
    spool = Spool(tmp_path / "spool")
    spool.append(payloads)
    dead = tmp_path / "spool" / DEAD_LETTER_FILE
    shipper = Shipper(spool, transport, dead_letter=dead)
    assert shipper.drain(time.monotonic() + 30)
    assert shipper.stats().rejected == 1 and spool.pending_bytes == 0
    frames, _ = parse_frames(dead.read_bytes())
    assert [decode(f).id for f in frames] == [future.id]
    assert all(r.ok for r in plane.audit.verify(OPERATOR))
    transport.close()
    spool.close()


def test_over_grpc_a_fault_in_a_later_message_acknowledges_nothing(
    control_plane: RunningControlPlane,
) -> None:
    """One call carries 1,200 records in three messages; the third fails to store. The call
    fails as a fault (the shipper retries: not a refusal to dead-letter), no id is acknowledged,
    and the re-send after the fault stores the rest exactly once."""
    plane, clock = control_plane.plane, control_plane.clock
    batch = mixed(clock, 0, 1200)
    already = sum(r.records_checked for r in plane.audit.verify(OPERATOR))  # the bootstrap's
    _fail_inserts_of(plane.store, batch[1100].id)
    transport = GrpcTransport(control_plane.address, TEST_SYNC_TOKEN, timeout=10)
    with pytest.raises(TransportError, match="INTERNAL") as info:
        transport.send([encode(e) for e in batch])
    assert not info.value.rejected
    with plane.store.read() as uow:
        kept = uow.audit.get_many([e.id for e in batch])
    # The call's messages are stored in one transaction (up to MESSAGES_PER_COMMIT of them):
    # the third's fault rolls back the first two as well.
    assert kept == {}
    _heal(plane.store)
    assert transport.send([encode(e) for e in batch]) == 1200
    reports = plane.audit.verify(OPERATOR)
    assert all(r.ok for r in reports) and sum(r.records_checked for r in reports) == already + 1200
    transport.close()


def test_over_grpc_a_call_commits_every_four_messages(
    control_plane: RunningControlPlane,
) -> None:
    """Six messages of 500: the first four are one transaction, the last two another. A fault
    in the sixth keeps the first four's records (committed, though unacknowledged: the re-send
    acknowledges them as duplicates) and nothing of the fifth."""
    plane, clock = control_plane.plane, control_plane.clock
    batch = mixed(clock, 0, 3000)
    already = sum(r.records_checked for r in plane.audit.verify(OPERATOR))
    _fail_inserts_of(plane.store, batch[2900].id)
    transport = GrpcTransport(control_plane.address, TEST_SYNC_TOKEN, timeout=10)
    with pytest.raises(TransportError, match="INTERNAL"):
        transport.send([encode(e) for e in batch])
    with plane.store.read() as uow:
        kept = uow.audit.get_many([e.id for e in batch])
    assert set(kept) == {e.id for e in batch[: 4 * 500]}
    _heal(plane.store)
    assert transport.send([encode(e) for e in batch]) == 3000
    reports = plane.audit.verify(OPERATOR)
    assert all(r.ok for r in reports) and sum(r.records_checked for r in reports) == already + 3000
    transport.close()


# -- the benchmark ---------------------------------------------------------------------------


def test_bench_ingest_ships_verifies_and_reports(tmp_path: Path) -> None:
    """``python -m bench.ingest`` end to end, small, on each backend installed here: every record
    it counts was acknowledged and is in a verified chain (it raises otherwise), and each row is
    complete."""
    from bench import ingest

    backends = ["sqlite", *(["postgres"] if postgres_available() else [])]
    out = tmp_path / "ingest.json"
    args = [a for b in backends for a in ("--backend", b)]
    assert ingest.main([*args, "--records", "4000", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["backend"], r["records"]) for r in rows] == [(b, 4000) for b in backends]
    assert all(r["control_plane_cpu_s"] > 0 and r["records_per_core_s"] > 0 for r in rows)
    assert all(r["ids"] == "time-ordered" for r in rows)  # as a sidecar's decision ids are


def test_bench_ingest_shapes_are_the_records_a_sidecar_ships() -> None:
    """Each ``--shape`` is one kind of decision record, as the sidecar's writer builds it: the
    fields that tell them apart (actor, action, workspace, reason, the token's metadata)."""
    from bench.ingest import SHAPES, records

    now = 1_800_000_000.0
    made = {shape: [decode(p) for p in records(200, 0, now, shape=shape)] for shape in SHAPES}
    assert {e.reason for e in made["mix"]} > {"ok", "insufficient_scope"}
    allow, unknown = made["allow"], made["unknown-key"]
    assert {(e.action, e.reason) for e in allow} == {("authz.allow", "ok")}
    assert all(e.actor.startswith("key_") and e.workspace for e in allow)
    assert {(e.action, e.actor, e.workspace) for e in unknown} == {("authz.deny", "anonymous", "")}
    assert {e.reason for e in unknown} == {"unknown_credential"}
    scope = made["wrong-scope"]
    assert {(e.action, e.reason) for e in scope} == {("authz.deny", "insufficient_scope")}
    token = made["token"]
    assert all(
        e.actor.startswith("usr_") and e.metadata["credential"].startswith("at_") for e in token
    )
    assert all(e.metadata["client_id"].startswith("app_") for e in token)
    assert len({e.actor for e in token}) == 50 and len({e.actor for e in allow}) > 150
    assert all(len({e.id for e in m}) == 200 for m in made.values())


def test_bench_ingest_ships_each_shape(tmp_path: Path) -> None:
    """``--shape`` end to end on SQLite: each shape's records are all acknowledged and verified
    in their chains (the bench raises otherwise), one row per shape."""
    from bench import ingest

    out = tmp_path / "ingest.json"
    shapes = ["unknown-key", "token"]
    args = ["--backend", "sqlite", "--records", "4000", "--json", str(out)]
    assert ingest.main([*args, *(a for s in shapes for a in ("--shape", s))]) == 0
    rows = json.loads(out.read_text())
    assert [(r["shape"], r["records"]) for r in rows] == [(s, 4000) for s in shapes]
