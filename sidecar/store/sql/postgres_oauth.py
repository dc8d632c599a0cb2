"""PostgreSQL repositories for the OAuth tables (migration 0002): SQLite's classes over a
``QmarkConnection``, so their SQL and row mapping exist once and the contract suite runs them
on both backends. Only the signing keys' insertion-order column differs (``seq``, an identity
column, where SQLite has ``rowid``)."""

from __future__ import annotations

from typing import Any

import psycopg

from sidecar.store.sql.oauth import SqlOAuthRepositories, SqlSigningKeys
from sidecar.store.sql.qmark import QmarkConnection

Conn = psycopg.Connection[Any]


class PgSigningKeys(SqlSigningKeys):
    """SigningKeyRepository; ties broken by the ``seq`` identity column."""

    ORDER_COLUMN = "seq"


class PgOAuthRepositories(SqlOAuthRepositories):
    """``uow.oauth`` over one PostgreSQL connection."""

    signing_keys_class = PgSigningKeys

    def __init__(self, conn: Conn) -> None:
        super().__init__(QmarkConnection(conn))
