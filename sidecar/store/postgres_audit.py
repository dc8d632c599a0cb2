"""AuditRepository over PostgreSQL: append links each record into its workspace's hash chain inside
the caller's transaction. Every write transaction holds the store's writer lock (postgres.py), so
the head read here is the head the record is appended after, even with several replicas, and
``seq`` (storage order, which tails resume from) is commit order. The SQL and the row mapping
are SQLite's."""

from __future__ import annotations

from typing import Any

import psycopg

from sidecar.core.audit_chain import next_link
from sidecar.store.sql import QmarkConnection
from sidecar.store.sqlite_audit import _COLUMNS, SqliteAudit, _record

Conn = psycopg.Connection[Any]


class PgAudit(SqliteAudit):
    """The SQLite repository's SQL (standard SQL) over psycopg."""

    def __init__(self, conn: Conn) -> None:
        super().__init__(QmarkConnection(conn))


def link_unchained(conn: Conn) -> int:
    """Link rows stored before the chain existed (chain_seq 0), in storage order; run inside
    the migration transaction. Returns how many rows it linked."""
    audit = PgAudit(conn)
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM audit_events WHERE chain_seq = 0 ORDER BY seq"
    ).fetchall()
    for row in rows:
        ev = _record(row).event
        link = next_link(ev, audit.head(ev.workspace))
        conn.execute(
            "UPDATE audit_events SET chain_seq = %s, prev_digest = %s, digest = %s WHERE seq = %s",
            (link.chain_seq, link.prev_digest, link.digest, row[0]),
        )
    return len(rows)
