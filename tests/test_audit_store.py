"""The audit trail over each real backend (a SQLite file, a PostgreSQL database): chain links
computed in the appending transaction, de-duplication, paging, verification of stored rows,
retention, and the 0003 migration."""

from __future__ import annotations

import sqlite3
from importlib import resources
from pathlib import Path

import pytest

from sidecar.core.audit import AuditEvent, event
from sidecar.core.audit_chain import GENESIS, Problem
from sidecar.core.audit_trail import NO_WORKSPACE, SIDECAR, AuditTrail
from sidecar.core.clock import FakeClock
from sidecar.core.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from sidecar.core.models import Principal, RequestContext
from sidecar.store.sql.sqlite import SqliteStore
from tests.support.rawsql import raw

KEY = b"checkpoint-key-for-tests-32bytes"
OPERATOR = RequestContext(Principal("key_op", "*", frozenset({"admin:full"})), "req_1")
ACME_ADMIN = RequestContext(Principal("key_ad", "acme", frozenset({"admin:full"})), "req_2")
SHIPPER = RequestContext(SIDECAR, "req_sidecar")
ACME_KEYS = RequestContext(Principal("key_km", "acme", frozenset({"keys:manage"})), "req_3")


def append(store: SqliteStore, *events: AuditEvent) -> None:
    with store.transaction() as uow:
        for ev in events:
            uow.audit.append(ev)


def ev(t: float, ws: str = "acme", action: str = "key.created", actor: str = "key_a") -> AuditEvent:
    return event(t, actor, action, ws, "key_t")


def rows(store: SqliteStore) -> list[tuple[object, ...]]:
    with raw(store) as conn:
        return conn.execute(
            "SELECT id, workspace, chain_seq, prev_digest, digest FROM audit_events ORDER BY seq"
        ).fetchall()


def test_each_workspace_has_its_own_chain(store: SqliteStore, clock: FakeClock) -> None:
    append(store, ev(1, "acme"), ev(2, "beta"), ev(3, "acme"))
    (_, _, s1, p1, d1), (_, _, s2, p2, _), (_, _, s3, p3, _) = rows(store)
    assert (s1, p1) == (1, GENESIS) and (s2, p2) == (1, GENESIS)
    assert (s3, p3) == (2, d1)
    trail = AuditTrail(store, clock, KEY)
    assert all(r.ok for r in trail.verify(OPERATOR))


def test_a_rolled_back_transaction_leaves_no_link(store: SqliteStore) -> None:
    def fail_after_append() -> None:
        with store.transaction() as uow:
            uow.audit.append(ev(1))
            raise RuntimeError

    with pytest.raises(RuntimeError):
        fail_after_append()
    append(store, ev(2))
    assert [r[2] for r in rows(store)] == [1]


def test_the_same_id_is_stored_once(store: SqliteStore) -> None:
    first = ev(1)
    with store.transaction() as uow:
        assert uow.audit.append(first) is True
        assert uow.audit.append(first) is False
    with store.transaction() as uow:
        assert uow.audit.append(first) is False
    assert len(rows(store)) == 1


def test_editing_a_stored_row_is_named_by_verify(store: SqliteStore, clock: FakeClock) -> None:
    append(store, *(ev(i) for i in range(1, 8)))
    target = rows(store)[4][0]
    with raw(store) as conn:
        conn.execute("UPDATE audit_events SET reason = 'nothing to see' WHERE id = ?", (target,))
    (report,) = AuditTrail(store, clock, KEY).verify(OPERATOR, "acme")
    assert report.first_break is not None
    assert report.first_break.record_id == target
    assert report.first_break.problem is Problem.DIGEST_MISMATCH
    assert report.records_checked == 4


def test_deleting_a_stored_row_is_named_by_verify(store: SqliteStore, clock: FakeClock) -> None:
    append(store, *(ev(i) for i in range(1, 8)))
    ids = [r[0] for r in rows(store)]
    with raw(store) as conn:
        conn.execute("DELETE FROM audit_events WHERE id = ?", (ids[2],))
    (report,) = AuditTrail(store, clock, KEY).verify(OPERATOR, "acme")
    assert report.first_break is not None
    assert report.first_break.problem is Problem.MISSING and report.first_break.record_id == ids[3]


def test_retention_keeps_the_chain_verifiable(store: SqliteStore, clock: FakeClock) -> None:
    append(store, *(ev(i) for i in range(1, 11)), ev(5, "beta"))
    trail = AuditTrail(store, clock, KEY)
    assert trail.prune(before=6.5) == 7  # acme 1..6, beta's one record
    reports = {r.workspace: r for r in trail.verify(OPERATOR)}
    assert reports["acme"].ok and reports["acme"].checkpoint_chain_seq == 6
    assert reports["beta"].ok and reports["beta"].records_checked == 0
    append(store, ev(20), ev(21, "beta"))
    reports = {r.workspace: r for r in trail.verify(OPERATOR)}
    assert reports["acme"].ok and reports["acme"].records_checked == 5
    assert reports["beta"].ok and reports["beta"].head is not None
    assert reports["beta"].head.chain_seq == 2
    # Pruning is repeatable; a second checkpoint supersedes the first.
    assert trail.prune(before=8.5) == 2
    assert all(r.ok for r in trail.verify(OPERATOR))


def test_retention_stops_at_a_record_newer_than_the_bound(
    store: SqliteStore, clock: FakeClock
) -> None:
    # A late-shipped decision record can be older than its predecessor in the chain; pruning
    # removes a prefix only, so the chain never has a hole.
    append(store, ev(1), ev(9), ev(2), ev(3))
    assert AuditTrail(store, clock, KEY).prune(before=5) == 1


def test_a_forged_checkpoint_is_reported(store: SqliteStore, clock: FakeClock) -> None:
    append(store, *(ev(i) for i in range(1, 6)))
    trail = AuditTrail(store, clock, KEY)
    trail.prune(before=3.5)
    with raw(store) as conn:
        conn.execute("UPDATE audit_checkpoints SET chain_seq = chain_seq + 1")
        conn.execute("DELETE FROM audit_events WHERE chain_seq = 4")
    (report,) = trail.verify(OPERATOR, "acme")
    assert report.first_break is not None
    assert report.first_break.problem is Problem.CHECKPOINT_INVALID


def test_a_broken_chain_is_not_pruned(store: SqliteStore, clock: FakeClock) -> None:
    append(store, *(ev(i) for i in range(1, 6)))
    with raw(store) as conn:
        conn.execute("UPDATE audit_events SET actor = 'x' WHERE chain_seq = 2")
    with pytest.raises(FailedPrecondition):
        AuditTrail(store, clock, KEY).prune(before=4.5)
    assert len(rows(store)) == 5


def test_paging_is_newest_first_by_time(store: SqliteStore, clock: FakeClock) -> None:
    # Stored out of time order, as late-shipped decision records are.
    append(store, *(ev(t) for t in (5, 1, 4, 2, 3, 3)))
    trail = AuditTrail(store, clock, KEY)
    query = trail.query(OPERATOR)
    seen: list[float] = []
    token = ""
    while True:
        page = trail.page(query, page_size=4, page_token=token)
        seen.extend(r.event.time for r in page.items)
        token = page.next_token
        if not token:
            break
    assert seen == [5, 4, 3, 3, 2, 1]


def test_filters(store: SqliteStore, clock: FakeClock) -> None:
    append(
        store,
        ev(1, "acme", "key.created", "key_a"),
        ev(2, "acme", "key.revoked", "key_b"),
        ev(3, "beta", "key.revoked", "key_a"),
        ev(4, "acme", "key.revoked", "key_a"),
    )
    trail = AuditTrail(store, clock, KEY)

    def times(**kw: object) -> list[float]:
        query = trail.query(OPERATOR, **kw)  # type: ignore[arg-type]
        return [r.event.time for r in trail.page(query).items]

    assert times(workspace="acme", action="key.revoked") == [4, 2]
    assert times(actor="key_a") == [4, 3, 1]
    assert times(since=2, until=4) == [3, 2]
    assert times(workspace="beta") == [3]


def test_access_needs_admin_full_in_the_workspace(store: SqliteStore, clock: FakeClock) -> None:
    append(store, ev(1, "acme"), ev(2, "beta"))
    trail = AuditTrail(store, clock, KEY)
    assert [r.event.workspace for r in trail.page(trail.query(ACME_ADMIN)).items] == ["acme"]
    with pytest.raises(PermissionDenied):
        trail.query(ACME_ADMIN, workspace="beta")
    with pytest.raises(PermissionDenied):
        trail.query(ACME_KEYS)
    with pytest.raises(PermissionDenied):
        trail.verify(ACME_ADMIN, "beta")
    assert [r.workspace for r in trail.verify(ACME_ADMIN)] == ["acme"]
    with pytest.raises(InvalidArgument):
        trail.query(OPERATOR, workspace="Bad Name")


def test_ingest_takes_decision_records_only(store: SqliteStore, clock: FakeClock) -> None:
    trail = AuditTrail(store, clock, KEY)
    deny = event(1, "anonymous", "authz.deny", "", "/v1/checks", outcome="deny")
    result = trail.ingest(SHIPPER, [deny, deny])
    assert result.acknowledged == [deny.id, deny.id] and result.stored == 1
    assert trail.ingest(SHIPPER, [deny]).stored == 0
    assert rows(store)[0][1] == NO_WORKSPACE
    # Refused as a value, with the field at fault; nothing stored under its id.
    forged = event(1, "key_a", "key.revoked", "acme", "key_b")
    refused = trail.ingest(SHIPPER, [forged])
    assert refused.acknowledged == [] and [r.field for r in refused.refused] == ["records.action"]
    assert trail.ingest(SHIPPER, [forged]).stored == 0 and len(rows(store)) == 1
    # Only sidecars write decision records: no API key, not even the operator's.
    for caller in (ACME_ADMIN, OPERATOR):
        with pytest.raises(PermissionDenied):
            trail.ingest(caller, [event(1, "key_a", "authz.allow", "acme", "/")])


def test_rows_stored_before_the_chain_are_linked_by_the_migration(
    tmp_path: Path, clock: FakeClock
) -> None:
    path = tmp_path / "old.db"
    folder = resources.files("sidecar.store.sql.migrations").joinpath("sqlite")
    with sqlite3.connect(path) as conn:
        conn.executescript(folder.joinpath("0001_init.sql").read_text())
        conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY)")
        conn.execute("INSERT INTO schema_migrations VALUES (1)")
        for i, ws in enumerate(["acme", "beta", "acme"]):
            conn.execute(
                "INSERT INTO audit_events (id, time, actor, action, workspace, target, outcome) "
                "VALUES (?, ?, 'key_a', 'key.created', ?, 'key_x', 'success')",
                (f"evt_{i}", 1.0 + i, ws),
            )
    store = SqliteStore(path)
    try:
        assert [r[2] for r in rows(store)] == [1, 1, 2]
        append(store, ev(10, "acme"))
        assert [r.records_checked for r in AuditTrail(store, clock, KEY).verify(OPERATOR)] == [3, 1]
    finally:
        store.close()
