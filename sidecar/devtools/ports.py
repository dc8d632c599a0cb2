"""Loopback port helpers for tests and the bench.

Prefer binding port 0 and asking the server for its port: :func:`free_port` can race with
another process that binds the same number between the check and the use. Use it only for
programs that cannot report the port they bound.
"""

from __future__ import annotations

import contextlib
import random
import socket
import time

__all__ = ["free_port", "free_ports", "port_accepts", "wait_for_port"]


# Ports handed out for servers that cannot bind port 0 come from below the kernel's ephemeral
# range (net.ipv4.ip_local_port_range). A number from inside it, once released, can be given to
# any later bind(0) or to a client connection's local port before the server binds it -- and a
# polling connect() to a not-yet-bound port in that range can even connect to itself (TCP
# simultaneous open), after which the server's bind fails. Above 20000: clear of the defaults
# (8080, 9191, 10000…) and of common services.
_LOWEST = 20000
_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"


def _ephemeral_start() -> int:
    try:
        with open(_RANGE_FILE) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Return ``count`` distinct ports that were free on ``host`` a moment ago, chosen at random
    below the ephemeral range (see above); bind(0) where that range leaves no room."""
    top = _ephemeral_start()
    chooser = random.SystemRandom()
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for _ in range(count * 50):
            if len(ports) == count or top - _LOWEST < 1000:
                break
            port = chooser.randrange(_LOWEST, top)
            sock = stack.enter_context(socket.socket())
            try:
                # Held open until all are chosen, so no number is handed out twice.
                sock.bind((host, port))
            except OSError:
                continue
            ports.append(port)
        while len(ports) < count:
            sock = stack.enter_context(socket.socket())
            sock.bind((host, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


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
