"""Shared fixtures: real SQLite files, a real PostgreSQL (one server per session, a fresh database
per test), a real control plane on 127.0.0.1:0, an injected clock."""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2_grpc
from sidecar.config import load_settings
from sidecar.controlplane import ControlPlane
from sidecar.core.clock import FakeClock
from sidecar.core.storage import Store
from sidecar.devtools.ports import free_port as _free_port
from sidecar.store.sql.sqlite import SqliteStore
from tests.support.ports import DEFAULT_PORTS, hold_ports
from tests.support.postgres import PostgresServer, postgres_available
from tests.support.sync import TEST_SYNC_TOKEN

_databases = itertools.count(1)

# The console scripts of the environment running the suite (envoy, hadolint, spauth…) come
# first on PATH, as in an activated venv: `make test` calls .venv/bin/python without activating,
# and a tool must never be skipped, or found elsewhere, because the venv was not activated.
_BIN = str(Path(sys.executable).parent)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _BIN:
    os.environ["PATH"] = _BIN + os.pathsep + os.environ.get("PATH", "")

# Fixtures of real servers used by several modules: redis_server, redis_url.
pytest_plugins = ["tests.support.redis"]


@pytest.fixture(scope="session", autouse=True)
def default_ports_taken() -> Iterator[list[int]]:
    """The product's default ports stay taken for the whole run, so a test that binds one fails
    here as it would next to `spauth serve` on its defaults: tests bind port 0 or a free port."""
    with hold_ports(DEFAULT_PORTS) as held:
        yield held


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole run (``make test`` installs it when missing)."""
    if not postgres_available():
        pytest.skip("PostgreSQL is not installed (make system-deps installs it)")
    with PostgresServer() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a fresh, empty database, dropped after the test."""
    name = f"spauth_test_{next(_databases)}"
    yield postgres_server.create_database(name)
    postgres_server.drop_database(name)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A fresh store on each backend: every test that uses it runs once per backend."""
    if request.param == "postgres":
        from sidecar.store.sql.postgres import PostgresStore

        s: Store = PostgresStore(request.getfixturevalue("postgres_url"))
    else:
        s = SqliteStore(tmp_path / "spauth.db")
    yield s
    s.close()


class LoopThread:
    """An asyncio loop on a background thread, so sync tests can drive async servers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: object, timeout: float = 30) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class RunningControlPlane:
    plane: ControlPlane
    address: str
    operator_key: str
    clock: FakeClock
    data_dir: Path

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address)

    def keys_stub(self, channel: grpc.Channel) -> api_keys_pb2_grpc.ApiKeyServiceStub:
        return api_keys_pb2_grpc.ApiKeyServiceStub(channel)


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture
def control_plane(
    tmp_path: Path, clock: FakeClock, loop_thread: LoopThread
) -> Iterator[RunningControlPlane]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    settings = load_settings(
        {
            "data_dir": str(data_dir),
            "admin_addr": "127.0.0.1:0",
            "http_addr": "127.0.0.1:0",  # the OAuth HTTP server (issue 4), never a fixed port
            "sweep_interval": "0.05",
            "sync_token": TEST_SYNC_TOKEN,
        },
        environ={},
    )
    plane = ControlPlane(settings, clock=clock)
    minted = plane.bootstrap()
    assert minted is not None
    loop_thread.run(plane.start())
    yield RunningControlPlane(
        plane, f"127.0.0.1:{plane.admin_port}", minted.secret, clock, data_dir
    )
    loop_thread.run(plane.aclose(grace=1))


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1 (see sidecar.devtools.ports)."""
    return _free_port()


def wait_until(predicate: object, timeout: float = 10.0, interval: float = 0.01) -> None:
    """Poll ``predicate()`` until true; fail with a clear message after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


@pytest.fixture
def sidecar_factory(tmp_path: Path, control_plane: RunningControlPlane) -> Iterator[object]:
    """Start sidecars against the control plane fixture; stopped at teardown."""
    from sidecar.config import SidecarSettings
    from sidecar.dataplane.process import Sidecar

    started: list[Sidecar] = []

    def start(wait: bool = True, **overrides: object) -> Sidecar:
        fields = {
            "listen": "127.0.0.1:0",
            "control_plane": control_plane.address,
            "state_dir": tmp_path / f"sidecar-{len(started)}",
            "metrics_addr": "127.0.0.1:0",  # never the fixed 9192: tests run sidecars side by side
            "sync_token": TEST_SYNC_TOKEN,
            **overrides,
        }
        sc = Sidecar(SidecarSettings(**fields), clock=control_plane.clock)  # type: ignore[arg-type]
        sc.start()
        started.append(sc)
        if wait:
            wait_until(lambda: sc.replica.loaded)
        return sc

    yield start
    for sc in started:
        sc.stop(grace=0.5)
