"""The HTTP server's socket options."""

from __future__ import annotations

import socket

from sidecar.ops.http_server import HttpServer


def test_listening_socket_disables_nagle() -> None:
    """uvicorn writes a response's headers and body separately; with Nagle on, each keep-alive
    response waited ~40 ms for the client's delayed ACK (the OAuth endpoint bench found it).
    Accepted connections inherit TCP_NODELAY from the listening socket on Linux."""
    server = HttpServer("127.0.0.1:0")
    server.bind()
    assert server._sock is not None
    try:
        assert server._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        with socket.create_connection(("127.0.0.1", server.port), timeout=5):
            server._sock.settimeout(5)  # bind() leaves it non-blocking for asyncio
            conn, _ = server._sock.accept()
            with conn:
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        server._sock.close()
