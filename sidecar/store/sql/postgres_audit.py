"""AuditRepository over PostgreSQL: append links each record into its workspace's hash chain inside
the caller's transaction. Every write transaction holds the store's writer lock (postgres.py), so
the head read here is the head the record is appended after, even with several replicas, and
``seq`` (storage order, which tails resume from) is commit order. The SQL and the row mapping
are SQLite's."""

from __future__ import annotations

from typing import Any

import psycopg

from sidecar.store.sql.audit import SqlAudit
from sidecar.store.sql.qmark import QmarkConnection

Conn = psycopg.Connection[Any]


class PgAudit(SqlAudit):
    """The SQLite repository's SQL (standard SQL) over psycopg."""

    def __init__(self, conn: Conn) -> None:
        super().__init__(QmarkConnection(conn))
