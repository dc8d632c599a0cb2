"""AuditRepository over PostgreSQL: append links each record into its workspace's hash chain inside
the caller's transaction. Every write transaction holds the store's writer lock (postgres.py), so
the head read here is the head the record is appended after, even with several replicas, and
``seq`` (storage order, which tails resume from) is commit order. The SQL and the row mapping
are SQLite's, except for a batch: its ids are looked up as one array parameter and its rows go
in with ``COPY`` (one statement and one round trip, where an INSERT per row cost the control
plane ≈ 400 µs of CPU per record in waits and protocol)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import psycopg

from sidecar.store.sql.audit import SqlAudit
from sidecar.store.sql.qmark import QmarkConnection

Conn = psycopg.Connection[Any]

_COPY = (
    "COPY audit_events (id, time, actor, action, workspace, target, outcome, reason, "
    "request_id, metadata, chain_seq, prev_digest, digest) FROM STDIN"
)


class PgAudit(SqlAudit):
    """The SQLite repository's SQL (standard SQL) over psycopg."""

    _ID_IN_BATCH = "id = ANY(?)"  # a text[] parameter

    def __init__(self, conn: Conn) -> None:
        super().__init__(QmarkConnection(conn))
        self._pg = conn

    def _batch_param(self, event_ids: Collection[str]) -> object:
        return list(event_ids)

    def _insert(self, rows: list[tuple[Any, ...]]) -> None:
        with self._pg.cursor().copy(_COPY) as copy:
            for row in rows:
                copy.write_row(row)
