"""Loopback port helpers; the shared ones live in :mod:`sidecar.devtools.ports` so the bench can
use them. The default-port guard is the tests' own."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

from sidecar.devtools.ports import free_port, free_ports, port_accepts, wait_for_port

__all__ = [
    "DEFAULT_PORTS",
    "free_port",
    "free_ports",
    "hold_ports",
    "port_accepts",
    "wait_for_port",
]

# What the product and the README bind by default: spauth serve (admin gRPC, OAuth HTTP, sidecar),
# a sidecar's metrics, the front-proxy Envoy (listener, admin) and the echo upstream.
DEFAULT_PORTS = (50051, 8080, 9191, 9192, 10000, 9901, 8081)


@contextlib.contextmanager
def hold_ports(ports: tuple[int, ...], host: str = "127.0.0.1") -> Iterator[list[int]]:
    """Bind each free one of ``ports`` (without listening) for the duration; yields those held.

    A test that binds a fixed default port then fails at once with EADDRINUSE on every machine,
    as it would next to a running ``spauth serve``; a client dialling one gets "connection
    refused", exactly as when nothing runs there. Ports already taken (a developer's server)
    are left alone: they block such a test just as well.
    """
    with contextlib.ExitStack() as stack:
        held = []
        for port in ports:
            sock = stack.enter_context(socket.socket())
            try:
                sock.bind((host, port))
            except OSError:
                continue
            held.append(port)
        yield held
