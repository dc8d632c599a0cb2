"""The reads a freshly started control plane runs over every key on SQLite, by query plan: the
expiry metric's count scans the table once instead of walking it through the workspace index
with a table lookup per row (1.7 s of CPU at a million keys, right when the first sidecar loads
its snapshot), and the snapshot build's unordered read leaves the sorting to its caller."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from sidecar.store.sql.sqlite import SqliteStore, SqlKeys


class Recording:
    """A real connection that remembers the statements it ran."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.ran: list[tuple[str, Any]] = []

    def execute(self, sql: str, parameters: Any = (), /) -> Any:
        self.ran.append((sql, parameters))
        return self.conn.execute(sql, parameters)


def plan_of(tmp_path: Path, read: Any) -> str:
    SqliteStore(tmp_path / "spauth.db").close()  # the migrated schema
    recording = Recording(sqlite3.connect(tmp_path / "spauth.db"))
    read(SqlKeys(recording))  # type: ignore[arg-type]
    ((sql, parameters),) = recording.ran
    rows = recording.conn.execute("EXPLAIN QUERY PLAN " + sql, parameters).fetchall()
    recording.conn.close()
    return " / ".join(str(r[3]) for r in rows)


def test_the_expiry_count_scans_the_table_once(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, lambda keys: keys.expiring_by_workspace(1000, 2000))
    assert plan.startswith("SCAN api_keys /"), plan
    assert "INDEX" not in plan, plan


def test_the_unordered_packing_read_does_not_sort(tmp_path: Path) -> None:
    assert plan_of(tmp_path, lambda keys: list(keys.packing_rows(1000, ordered=False))) == (
        "SCAN api_keys"
    )
    ordered = plan_of(tmp_path, lambda keys: list(keys.packing_rows(1000)))
    assert "USE TEMP B-TREE FOR ORDER BY" in ordered, ordered
