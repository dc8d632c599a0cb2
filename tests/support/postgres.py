"""The throwaway PostgreSQL server of :mod:`sidecar.devtools.postgres_server`, where the tests have
always imported it from (the bench uses it too, so it lives outside tests/)."""

from __future__ import annotations

from sidecar.devtools.postgres_server import PostgresServer, find_bin_dir, postgres_available

__all__ = ["PostgresServer", "find_bin_dir", "postgres_available"]
