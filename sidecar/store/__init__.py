"""Storage implementations of the narrow Protocols in ``sidecar.core.storage``; backends chosen
in one place (``open_store``)."""

from __future__ import annotations

from pathlib import Path

from sidecar.core.storage import Store


def open_store(url: str) -> Store:
    """Open the store named by ``url``: ``postgresql://…`` (several control-plane replicas share
    it), or ``sqlite:///path/to/file.db`` / a bare file path (the embedded default)."""
    if url.startswith(("postgres://", "postgresql://")):
        # Imported here so the embedded product never needs psycopg installed.
        from sidecar.store.sql.postgres import PostgresStore

        # A replica may start before its database: wait for it rather than crash-loop.
        return PostgresStore(url, startup_timeout=60.0)
    if url.startswith("sqlite:///"):
        url = url[len("sqlite:///") - 1 :]
    elif url.startswith("sqlite://"):
        url = url[len("sqlite://") :]
    from sidecar.store.sql.sqlite import SqliteStore

    return SqliteStore(Path(url))


__all__ = ["Store", "open_store"]
