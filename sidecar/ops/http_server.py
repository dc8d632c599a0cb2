"""Serve an ASGI app with uvicorn inside the already running event loop (the control plane's),
so it starts and stops with the rest of the process instead of owning the loop and the signal
handlers the way ``uvicorn.run`` and ``Server.serve`` do; optionally over TLS.

Lifecycle: ``bind()`` claims the port (so
the OAuth issuer can name it), ``start(app)`` serves, ``aclose()`` drains."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import uvicorn
from starlette.types import ASGIApp

from sidecar.ops.http_guard import HttpLimits, guarded_protocol, quiet_disconnects
from sidecar.ops.status_server import split_addr


class HttpServer:
    """uvicorn on ``addr`` (port 0: any), plaintext or with ``ssl_files = (cert, key)``."""

    def __init__(
        self,
        addr: str,
        *,
        ssl_files: tuple[str, str] | None = None,
        limits: HttpLimits | None = None,
    ) -> None:
        self.addr = addr
        self.ssl_files = ssl_files
        self.limits = limits or HttpLimits()
        self.port = 0
        self._sock: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._ticker: asyncio.Task[None] | None = None

    def bind(self) -> int:
        """Listen on ``addr`` and return the bound port (idempotent)."""
        if self._sock is None:
            host, port = split_addr(self.addr)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            try:
                sock = socket.create_server((host, port), family=family)
            except OSError as exc:
                raise OSError(f"http_addr: cannot listen on {self.addr} ({exc.strerror})") from None
            # asyncio sets TCP_NODELAY only on sockets created with proto=IPPROTO_TCP, and
            # create_server() passes 0: without this, uvicorn's two writes (headers, body) make
            # every keep-alive response wait ~40 ms for the client's delayed ACK (Nagle).
            # Accepted connections inherit it from the listening socket on Linux.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            self._sock = sock
            self.port = int(sock.getsockname()[1])
        return self.port

    async def start(self, app: ASGIApp) -> None:
        self.bind()
        certfile, keyfile = self.ssl_files or (None, None)
        config = uvicorn.Config(
            quiet_disconnects(app),
            # Deadlines for headers and body, and a connection cap (sidecar/ops/http_guard.py).
            http=guarded_protocol(self.limits),
            lifespan="off",
            log_config=None,  # keep our JSON logging
            access_log=False,
            server_header=False,
            proxy_headers=False,
            ssl_certfile=certfile,
            ssl_keyfile=keyfile,
            timeout_graceful_shutdown=5,
        )
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[self._sock] if self._sock else None)
        self._server = server
        # main_loop only ticks (Date header, max-requests); it returns once should_exit is set.
        self._ticker = asyncio.create_task(server.main_loop())

    def open_connections(self) -> int:
        """Connections open now (bounded by ``limits.max_connections``)."""
        return len(self._server.server_state.connections) if self._server else 0

    async def aclose(self, grace: float = 5.0) -> None:
        """Stop accepting, give open requests ``grace`` seconds, close."""
        server, self._server = self._server, None
        if server is not None:
            server.should_exit = True
            if self._ticker is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await self._ticker
            server.config.timeout_graceful_shutdown = max(1, int(grace))
            await server.shutdown(sockets=[self._sock] if self._sock else None)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
