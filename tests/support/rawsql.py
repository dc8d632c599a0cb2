"""Raw SQL on a store's database, bypassing the repositories: for tests that tamper with stored
rows (the audit chain must notice) or look at columns no Protocol exposes. One helper for both
backends; statements use ``?`` placeholders, as SQLite does."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import psycopg

from sidecar.core.storage import Store
from sidecar.store.sql.postgres import PostgresStore
from sidecar.store.sql.sqlite import SqliteStore


class Rows(Protocol):
    def fetchall(self) -> list[Any]: ...

    def fetchone(self) -> Any: ...


class Raw(Protocol):
    def execute(self, sql: str, args: Sequence[object] = ()) -> Rows: ...


class _Postgres:
    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, sql: str, args: Sequence[object] = ()) -> Rows:
        return self._conn.execute(sql.replace("?", "%s"), tuple(args))


@contextmanager
def raw(store: Store) -> Iterator[Raw]:
    """A connection to ``store``'s database; what it executes is committed on exit."""
    if isinstance(store, PostgresStore):
        with psycopg.connect(store.url, autocommit=True) as pg:
            yield _Postgres(pg)
        return
    assert isinstance(store, SqliteStore)
    with sqlite3.connect(store.path) as conn:
        yield conn
    conn.close()
