"""uvicorn inside the control plane's event loop, with an explicit lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handling: the process that embeds it owns SIGTERM/SIGINT
    and shuts the server down through ``HttpServer.aclose``."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(addr: str) -> socket.socket:
    """A listening TCP socket on ``HOST:PORT`` (port 0 picks a free one)."""
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, int(port)), family=family)
    except OSError as exc:
        raise OSError(f"http_addr: cannot listen on {addr}: {exc.strerror or exc}") from None


class HttpServer:
    """``bind()`` claims the port (so the issuer can name it), ``start(app)`` serves, and
    ``aclose()`` stops accepting and drains in-flight requests."""

    def __init__(self, addr: str) -> None:
        self.addr = addr
        self.port = 0
        self._sock: socket.socket | None = None
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    def bind(self) -> int:
        """Listen on ``addr`` and return the bound port."""
        if self._sock is None:
            self._sock = bind(self.addr)
            self.port = int(self._sock.getsockname()[1])
        return self.port

    async def start(self, app: ASGIApp) -> None:
        sock = self._sock
        if sock is None:
            self.bind()
            sock = self._sock
        assert sock is not None
        config = uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=5,
        )
        server = _EmbeddedServer(config)
        self._server = server
        self._task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if self._task.done():
                self._task.result()
                raise OSError(f"http_addr: the HTTP server on {self.addr} did not start")
            await asyncio.sleep(0.01)

    async def aclose(self, grace: float = 5.0) -> None:
        if self._server is None or self._task is None:
            if self._sock is not None:
                self._sock.close()
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace + 1)
        except TimeoutError:
            self._server.force_exit = True
            await self._task
        if self._sock is not None:
            self._sock.close()
