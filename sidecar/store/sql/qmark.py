"""One dialect of SQL for both backends: repositories are written against ``Executes`` with
SQLite's ``?`` placeholders; the PostgreSQL store hands them a ``QmarkConnection`` over psycopg.
(Only statements that are standard SQL are shared; dialect-specific ones stay in their backend.)"""

from __future__ import annotations

from typing import Any, Protocol


class Executes(Protocol):
    """A connection's ``execute`` with ``?`` placeholders (sqlite3 has exactly this)."""

    def execute(self, sql: str, parameters: Any = ..., /) -> Any: ...

    def executemany(self, sql: str, parameters: Any, /) -> Any: ...


class QmarkConnection:
    """psycopg (or any ``%s``-style connection) spoken to with ``?`` placeholders."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def execute(self, sql: str, parameters: Any = (), /) -> Any:
        return self._conn.execute(sql.replace("?", "%s"), parameters)

    def executemany(self, sql: str, parameters: Any, /) -> Any:
        cursor = self._conn.cursor()
        cursor.executemany(sql.replace("?", "%s"), parameters)
        return cursor
