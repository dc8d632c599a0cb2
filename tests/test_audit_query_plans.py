"""The audit table's indexes serve the reads a tenant can trigger. A tail or export of one
workspace reads in storage order (``seq``), which only ``audit_events_workspace (workspace, seq)``
serves: ``audit_events_chain (workspace, chain_seq)`` is keyed on chain position and partial.
Without it SQLite walks every tenant's rows after the cursor (measured at 100,000 rows: a small
workspace's export 0.06 ms → 25 ms), so a tenant with a short trail could make every control
plane scan the whole trail. Issue #19 asked whether the index is redundant; this keeps the
answer checked. Each statement is the one ``SqlAudit`` runs, captured from a real SQLite file."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from sidecar.core.audit import AuditQuery
from sidecar.store.sql.audit import SqlAudit
from sidecar.store.sql.sqlite import SqliteStore


class Recording:
    """A real sqlite3 connection that remembers the statements it ran."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.ran: list[tuple[str, Any]] = []

    def execute(self, sql: str, parameters: Any = (), /) -> Any:
        self.ran.append((sql, parameters))
        return self.conn.execute(sql, parameters)

    def executemany(self, sql: str, parameters: Any, /) -> Any:
        return self.conn.executemany(sql, parameters)


def plan_of(tmp_path: Path, read: str) -> str:
    store = SqliteStore(tmp_path / "spauth.db")  # the migrated schema
    store.close()
    recording = Recording(sqlite3.connect(tmp_path / "spauth.db"))
    audit = SqlAudit(recording)
    one = AuditQuery(workspaces=frozenset({"acme"}))
    calls = {
        "after": lambda: audit.after(0, one, 500),
        "after_action": lambda: audit.after(0, AuditQuery(frozenset({"acme"}), "authz.deny"), 500),
        "chain": lambda: audit.chain("acme", 0, 500),
        "page": lambda: audit.page(one, 51, None),
    }
    calls[read]()
    sql, parameters = recording.ran[-1]
    rows = recording.conn.execute("EXPLAIN QUERY PLAN " + sql, parameters).fetchall()
    recording.conn.close()
    return " / ".join(str(r[3]) for r in rows)


def test_a_workspace_tail_or_export_reads_its_own_rows_in_storage_order(tmp_path: Path) -> None:
    for read in ("after", "after_action"):
        plan = plan_of(tmp_path, read)
        assert "USING INDEX audit_events_workspace (workspace=? AND seq>?)" in plan, plan
        assert "TEMP B-TREE" not in plan, plan


def test_verify_walks_the_chain_index_and_listing_the_time_index(tmp_path: Path) -> None:
    assert "USING INDEX audit_events_chain (workspace=? AND chain_seq>?)" in plan_of(
        tmp_path, "chain"
    )
    page = plan_of(tmp_path, "page")
    assert "USING INDEX audit_events_workspace_time (workspace=?)" in page, page
    assert "TEMP B-TREE" not in page, page
