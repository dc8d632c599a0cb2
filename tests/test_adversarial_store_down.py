"""Replication while the database is down: ``Subscribe`` answers ``UNAVAILABLE`` (retryable: the
sidecar keeps serving from its replica and retries), never ``UNKNOWN`` with a traceback. Its
own PostgreSQL server, killed mid-test."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from sidecar._gen.statuspulse.auth.v1 import replication_pb2 as rpb
from sidecar._gen.statuspulse.auth.v1 import replication_pb2_grpc as rpb_grpc
from sidecar.config import Settings, load_settings
from sidecar.controlplane import AUDIT_PRUNE_INTERVAL, ControlPlane
from sidecar.core import kek
from sidecar.core.clock import FakeClock
from tests.conftest import LoopThread, bearer, wait_until
from tests.support.postgres import PostgresServer, postgres_available
from tests.support.sync import TEST_SYNC_TOKEN

pytestmark = pytest.mark.skipif(not postgres_available(), reason="PostgreSQL not installed")


@pytest.fixture
def pg() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


def test_subscribe_answers_unavailable_while_the_store_is_down(
    pg: PostgresServer, tmp_path: Path, loop_thread: LoopThread, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(pg, tmp_path, "down")
    plane = ControlPlane(settings, clock=FakeClock())
    loop_thread.run(plane.start())
    try:
        with grpc.insecure_channel(f"127.0.0.1:{plane.admin_port}") as ch:
            stub = rpb_grpc.ReplicationServiceStub(ch)
            md = bearer(TEST_SYNC_TOKEN)
            first = next(iter(stub.Subscribe(rpb.SubscribeRequest(), metadata=md, timeout=10)))
            assert first.HasField("snapshot")
            pg.kill()
            caplog.set_level(logging.WARNING)
            with pytest.raises(grpc.RpcError) as info:
                for _ in stub.Subscribe(rpb.SubscribeRequest(), metadata=md, timeout=60):
                    pass
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE, info.value  # type: ignore[attr-defined]
        assert not [r for r in caplog.records if r.exc_info], caplog.text  # no traceback
    finally:
        loop_thread.run(plane.aclose(grace=0))


def _settings(pg: PostgresServer, tmp_path: Path, database: str, **extra: float) -> Settings:
    return load_settings(
        {
            "data_dir": str(tmp_path),
            "database_url": pg.create_database(database),
            "admin_addr": "127.0.0.1:0",
            "http_addr": "127.0.0.1:0",
            "sync_token": TEST_SYNC_TOKEN,
            "key_encryption_key": kek.generate(),  # a shared store needs one (issue #14)
            **extra,
        },
        environ={},
    )


def _passes_said_while_down(
    pg: PostgresServer,
    tmp_path: Path,
    loop_thread: LoopThread,
    caplog: pytest.LogCaptureFixture,
    settings: Settings,
    messages: set[str],
    *,
    after_kill: float = 0.0,
) -> None:
    """A control plane on ``settings`` whose database is killed (its fake clock then moved on
    ``after_kill`` seconds): waits until each of ``messages`` was logged, and requires every
    such line to be a WARNING without a traceback."""
    clock = FakeClock()
    plane = ControlPlane(settings, clock=clock)
    loop_thread.run(plane.start())
    try:
        caplog.set_level(logging.WARNING, logger="sidecar.controlplane")
        pg.kill()
        clock.advance(after_kill)

        def said() -> list[logging.LogRecord]:
            return [r for r in caplog.records if r.getMessage() in messages]

        wait_until(lambda: {r.getMessage() for r in said()} == messages, timeout=30)
        assert all(r.levelno == logging.WARNING and not r.exc_info for r in said()), caplog.text
    finally:
        loop_thread.run(plane.aclose(grace=0))


def test_the_sweeper_says_the_store_is_down_without_a_traceback(
    pg: PostgresServer, tmp_path: Path, loop_thread: LoopThread, caplog: pytest.LogCaptureFixture
) -> None:
    """A sweep meeting the database down is an expected condition: a warning it retries, not an
    ERROR with a traceback (which sent the Subscribe test above red when a sweep happened to
    run while its store was down)."""
    settings = _settings(pg, tmp_path, "sweep", sweep_interval=0.05)
    messages = {"sweep failed; retrying"}
    _passes_said_while_down(pg, tmp_path, loop_thread, caplog, settings, messages)


def test_the_retention_passes_say_the_store_is_down_without_an_error(
    pg: PostgresServer, tmp_path: Path, loop_thread: LoopThread, caplog: pytest.LogCaptureFixture
) -> None:
    """The hourly retention passes (usage, and audit when a retention is set) meeting the
    database down: a warning they retry, like the sweep's, not an ERROR an operator's alert on
    ERROR lines would page for. The clock is moved past the prune interval after the kill, so
    the next sweep runs both passes against the down store."""
    settings = _settings(pg, tmp_path, "retention", sweep_interval=0.05, audit_retention=86400)
    messages = {"usage retention failed; retrying", "audit retention failed; retrying"}
    _passes_said_while_down(
        pg, tmp_path, loop_thread, caplog, settings, messages, after_kill=AUDIT_PRUNE_INTERVAL + 1
    )


def test_the_webhook_outbox_says_the_store_is_down_without_a_traceback(
    pg: PostgresServer, tmp_path: Path, loop_thread: LoopThread, caplog: pytest.LogCaptureFixture
) -> None:
    """The webhook delivery pass (every webhook_poll_interval, 1 s by default) reads the outbox
    from the store: with the database down that is the same expected condition as a sweep. Its
    ERROR with a traceback could send the Subscribe test above red: a pass that starts after the
    kill gives up when the pool's 3 s wait ends, and on a loaded machine that can come before the
    Subscribe's own read gives up. Here the pass runs every 50 ms, so it meets the store down at
    once, whatever the load."""
    settings = _settings(pg, tmp_path, "outbox", webhook_poll_interval=0.05)
    messages = {"webhook delivery pass failed; retrying"}
    _passes_said_while_down(pg, tmp_path, loop_thread, caplog, settings, messages)
