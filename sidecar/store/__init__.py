"""Storage behind narrow Protocols (``base``); backends chosen in one place (``open_store``)."""

from __future__ import annotations

from pathlib import Path

from sidecar.store.base import Store


def open_store(url: str) -> Store:
    """Open the store named by ``url``: ``sqlite:///path/to/file.db`` or a bare file path."""
    if url.startswith("sqlite:///"):
        url = url[len("sqlite:///") - 1 :]
    elif url.startswith("sqlite://"):
        url = url[len("sqlite://") :]
    if url.startswith(("postgres://", "postgresql://")):
        raise ValueError("database url: PostgreSQL support is not built in this version")
    from sidecar.store.sqlite import SqliteStore

    return SqliteStore(Path(url))


__all__ = ["Store", "open_store"]
