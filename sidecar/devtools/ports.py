"""Loopback port helpers for tests and the bench.

Prefer binding port 0 and asking the server for its port: :func:`free_port` can race with
another process that binds the same number between the check and the use. Use it only for
programs that cannot report the port they bound.
"""

from __future__ import annotations

import contextlib
import socket
import time

__all__ = ["free_port", "free_ports", "port_accepts", "wait_for_port"]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Return ``count`` distinct ports that were free on ``host`` a moment ago."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            # Hold all of them open at once so the kernel cannot hand out the same number twice.
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def free_port(host: str = "127.0.0.1") -> int:
    """Return one port that was free on ``host`` a moment ago."""
    return free_ports(1, host)[0]


def port_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether a TCP connection to ``host:port`` succeeds now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Block until ``host:port`` accepts TCP connections; ``TimeoutError`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not port_accepts(host, port):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing accepted connections on {host}:{port} in {timeout}s")
        time.sleep(0.02)
