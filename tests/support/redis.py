"""pytest fixtures over :class:`sidecar.devtools.redis_server.RedisServer` (a real redis-server).

Fixtures: ``redis_server`` (one per session, flushed after each test that uses it through
``redis_url``) and ``redis_url``. Tests that kill Redis start their own :class:`RedisServer`;
without a ``redis-server`` binary those tests are skipped, not failed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sidecar.devtools import redis_server as _devtools

__all__ = ["RedisServer", "redis_server", "redis_url"]


class RedisServer(_devtools.RedisServer):
    """The devtools server, skipping the test when redis-server is not installed."""

    def __init__(self, port: int = 0) -> None:
        try:
            super().__init__(port)
        except _devtools.RedisNotInstalled as exc:
            pytest.skip(str(exc))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """The shared server's URL; the server is flushed after the test."""
    if not redis_server.running:
        redis_server.start()
    yield redis_server.url
    redis_server.flush()
