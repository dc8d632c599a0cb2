"""The control plane's HTTP port against slow and vanishing clients: a request must send its
headers and its body within their deadlines, open connections are capped, and a client that
disconnects mid-body is an info line, not an error with a traceback. A real control plane, real
sockets; the tests wait for the server to act, never assert on durations."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sidecar.config import load_settings
from sidecar.controlplane import ControlPlane
from sidecar.core.clock import FakeClock
from sidecar.oauth.rfc8414 import TOKEN_PATH
from tests.conftest import LoopThread, wait_until
from tests.support.sync import TEST_SYNC_TOKEN

StartPlane = Callable[..., ControlPlane]


@pytest.fixture
def start_plane(tmp_path: Path, loop_thread: LoopThread) -> Iterator[StartPlane]:
    planes: list[ControlPlane] = []

    def start(**limits: str) -> ControlPlane:
        settings = load_settings(
            {
                "data_dir": str(tmp_path / f"cp{len(planes)}"),
                "admin_addr": "127.0.0.1:0",
                "http_addr": "127.0.0.1:0",
                "sync_token": TEST_SYNC_TOKEN,
                **limits,
            },
            environ={},
        )
        plane = ControlPlane(settings, clock=FakeClock())
        loop_thread.run(plane.start())
        planes.append(plane)
        return plane

    yield start
    for plane in planes:
        loop_thread.run(plane.aclose(grace=0))


def connect(plane: ControlPlane) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", plane.http_port), timeout=30)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """Blocks until the server closes (b'') or answers; True when it closed without a word."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def test_a_client_trickling_its_headers_is_disconnected(start_plane: StartPlane) -> None:
    plane = start_plane(http_read_timeout="0.3")
    sock = connect(plane)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
    assert closed_by_server(sock)
    sock.close()
    # A prompt client is served as usual.
    with connect(plane) as ok:
        ok.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert ok.recv(65536).startswith(b"HTTP/1.1 200")


def test_a_client_trickling_its_body_is_disconnected_quietly(
    start_plane: StartPlane, caplog: pytest.LogCaptureFixture
) -> None:
    plane = start_plane(http_body_timeout="0.3")
    caplog.set_level(logging.INFO)
    sock = connect(plane)
    head = f"POST {TOKEN_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
    sock.sendall(f"{head}Content-Type: application/x-www-form-urlencoded\r\n\r\n".encode())
    sock.sendall(b"grant_type")  # 10 of 100 bytes, then nothing
    assert closed_by_server(sock)
    sock.close()
    wait_until(lambda: "http request too slow" in caplog.text)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_a_client_that_disconnects_mid_body_is_an_info_line(
    start_plane: StartPlane, caplog: pytest.LogCaptureFixture
) -> None:
    plane = start_plane()
    caplog.set_level(logging.INFO)
    sock = connect(plane)
    head = f"POST {TOKEN_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
    sock.sendall(f"{head}Content-Type: application/x-www-form-urlencoded\r\n\r\n".encode())
    sock.sendall(b"grant_type")
    sock.close()
    wait_until(lambda: "http client disconnected" in caplog.text)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], caplog.text
    info = [r for r in caplog.records if "http client disconnected" in r.getMessage()]
    assert all(r.levelno == logging.INFO and r.exc_info is None for r in info)


def test_open_connections_are_capped(start_plane: StartPlane) -> None:
    plane = start_plane(http_max_connections="3", http_read_timeout="60")
    held = [connect(plane) for _ in range(3)]
    # Each held connection is accepted (the server sees it) before the next one is tried.
    wait_until(lambda: plane.http.open_connections() == 3)
    extra = connect(plane)
    assert closed_by_server(extra)
    extra.close()
    for sock in held:
        sock.close()
    wait_until(lambda: plane.http.open_connections() == 0)
    with connect(plane) as ok:
        ok.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert ok.recv(65536).startswith(b"HTTP/1.1 200")
