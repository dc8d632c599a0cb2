"""Migration 0011 (audit indexes ascending, the index of unlinked rows) on a database that holds a
trail: built at migration 0010 from the migration files themselves, filled by the repository of
that schema, then opened by the store. Listing order (newest first, ties by storage order),
tails, verification and retention must come out as before, on both backends."""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from sidecar.core.audit import event
from sidecar.core.audit_trail import AuditTrail
from sidecar.core.clock import FakeClock
from sidecar.core.models import Principal, RequestContext
from sidecar.core.storage import Store
from sidecar.store.sql import migrations
from sidecar.store.sql.audit import SqlAudit
from sidecar.store.sql.postgres import PostgresStore
from sidecar.store.sql.postgres_audit import PgAudit
from sidecar.store.sql.qmark import QmarkConnection
from sidecar.store.sql.sqlite import SqliteStore

KEY = b"checkpoint-key-for-tests-32bytes"
OPERATOR = RequestContext(Principal("key_op", "*", frozenset({"admin:full"})), "req_1")
BEFORE = 10  # the last migration before the one under test

# Stored in this order: times out of order (late-shipped records) and ties, which list by seq.
STORED = [(1, "acme"), (5, "acme"), (3, "beta"), (4, "acme"), (3, "acme"), (3, "acme")]
STORED += [(3, "beta"), (2, "acme"), (6, "beta"), (3, "acme")]
# Written by a control plane older than the chain (a rolling upgrade): linked on the next start.
UNLINKED = (3, "acme")

INSERT_UNLINKED = (
    "INSERT INTO audit_events (id, time, actor, action, workspace, target, outcome) "
    "VALUES ('evt_unlinked', ?, 'key_a', 'key.created', ?, 'key_t', 'success')"
)


def fill(audit: SqlAudit, conn: Any) -> None:
    """The trail, through the repository of the old schema, one record per transaction."""
    for t, ws in STORED:
        audit.append_new([event(float(t), "key_a", "key.created", ws, "key_t")])
    conn.execute(INSERT_UNLINKED, UNLINKED)


@contextmanager
def sqlite_at_0010(tmp_path: Path) -> Iterator[Store]:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY)")
    for version, sql in migrations.load("sqlite"):
        if version <= BEFORE:
            for statement in migrations.statements(sql):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations (version) VALUES (?)", (version,))
    fill(SqlAudit(conn), conn)
    conn.close()
    store = SqliteStore(path)
    try:
        yield store
    finally:
        store.close()


@contextmanager
def postgres_at_0010(url: str) -> Iterator[Store]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY)")
        for version, sql in migrations.load("postgres"):
            if version <= BEFORE:
                for statement in migrations.statements(sql):
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
        fill(PgAudit(conn), QmarkConnection(conn))
    store = PostgresStore(url)
    try:
        yield store
    finally:
        store.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def migrated(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        with sqlite_at_0010(tmp_path) as store:
            yield store
    else:
        with postgres_at_0010(request.getfixturevalue("postgres_url")) as store:
            yield store


def index_definitions(store: Store) -> dict[str, str]:
    if isinstance(store, SqliteStore):
        with sqlite3.connect(store.path) as conn:
            found = conn.execute(
                "SELECT name, sql FROM sqlite_master WHERE type = 'index' "
                "AND tbl_name = 'audit_events' AND sql IS NOT NULL"
            ).fetchall()
        conn.close()
    else:
        assert isinstance(store, PostgresStore)
        with psycopg.connect(store.url) as pg:
            found = pg.execute(
                "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'audit_events'"
            ).fetchall()
    # One spelling for both: PostgreSQL quotes the column "time".
    return {str(name): " ".join(str(sql).replace('"', "").split()) for name, sql in found}


def test_the_migration_makes_the_time_indexes_ascending(migrated: Store) -> None:
    found = index_definitions(migrated)
    assert "(time, seq)" in found["audit_events_time"]
    assert "(workspace, time, seq)" in found["audit_events_workspace_time"]
    assert "WHERE" in found["audit_events_unchained"]
    assert not any("DESC" in sql for sql in found.values()), found


def test_a_migrated_trail_lists_tails_verifies_and_prunes_as_before(
    migrated: Store, clock: FakeClock
) -> None:
    trail = AuditTrail(migrated, clock, KEY)
    stored = [*STORED, UNLINKED]
    # Newest first by time, ties by storage order (seq) newest first: the order before 0011.
    expected = sorted(range(len(stored)), key=lambda i: (-stored[i][0], -i))
    for workspace, query in (
        ("", trail.query(OPERATOR)),
        ("acme", trail.query(OPERATOR, workspace="acme")),
    ):
        listed: list[tuple[float, str, int]] = []
        token = ""
        while True:  # pages of 3: every next-page token crosses a tie
            page = trail.page(query, page_size=3, page_token=token)
            listed.extend((r.event.time, r.event.workspace, r.seq) for r in page.items)
            token = page.next_token
            if not token:
                break
        want = [stored[i] for i in expected if not workspace or stored[i][1] == workspace]
        assert [(t, ws) for t, ws, _ in listed] == [(float(t), ws) for t, ws in want]
        seqs = [seq for _, _, seq in listed]
        assert len(set(seqs)) == len(seqs)
        for (t1, _, s1), (t2, _, s2) in itertools.pairwise(listed):
            assert (t1, s1) > (t2, s2)

    # A tail reads in storage order; the unlinked record was linked at the start, last.
    tail, _ = trail.after(trail.query(OPERATOR, workspace="acme"), 0)
    assert [r.event.time for r in tail] == [float(t) for t, ws in stored if ws == "acme"]
    assert [r.link.chain_seq for r in tail] == list(range(1, len(tail) + 1))
    reports = {r.workspace: r for r in trail.verify(OPERATOR)}
    assert {ws: r.records_checked for ws, r in reports.items()} == {"acme": 8, "beta": 3}
    assert all(r.ok for r in reports.values())

    # Retention cuts each chain before its first record at or after the bound: acme's 1 goes
    # (then 5), beta's 3, 3 (then 6); then acme's whole chain, to a checkpoint.
    assert trail.prune(before=3.5) == 1 + 2
    reports = {r.workspace: r for r in trail.verify(OPERATOR)}
    assert {ws: r.records_checked for ws, r in reports.items()} == {"acme": 7, "beta": 1}
    assert all(r.ok for r in reports.values())
    assert trail.prune(before=5.5) == 7
    reports = {r.workspace: r for r in trail.verify(OPERATOR)}
    assert {ws: r.records_checked for ws, r in reports.items()} == {"acme": 0, "beta": 1}
    assert all(r.ok for r in reports.values())
