"""Serve an ASGI app with uvicorn inside the already running event loop (the control plane's),
so it starts and stops with the rest of the process instead of owning the loop and the signal
handlers the way ``uvicorn.run`` and ``Server.serve`` do."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import uvicorn
from starlette.types import ASGIApp

from sidecar.ops.status_server import split_addr


class HttpServer:
    """``await start()`` binds ``addr`` (port 0: any) and serves; ``await aclose()`` stops."""

    def __init__(
        self, app: ASGIApp, addr: str, *, ssl_files: tuple[str, str] | None = None
    ) -> None:
        certfile, keyfile = ssl_files or (None, None)
        self.addr = addr
        self.config = uvicorn.Config(
            app,
            log_config=None,  # keep our JSON logging
            access_log=False,
            lifespan="off",
            ssl_certfile=certfile,
            ssl_keyfile=keyfile,
            timeout_graceful_shutdown=5,
        )
        self._server: uvicorn.Server | None = None
        self._sock: socket.socket | None = None
        self._ticker: asyncio.Task[None] | None = None
        self.port = 0

    def _bind(self) -> socket.socket:
        host, port = split_addr(self.addr)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise OSError(f"http_addr: cannot listen on {self.addr} ({exc.strerror})") from None
        sock.listen(128)
        sock.setblocking(False)
        return sock

    async def start(self) -> None:
        self._sock = self._bind()
        self.port = int(self._sock.getsockname()[1])
        self.config.load()
        server = uvicorn.Server(self.config)
        server.lifespan = self.config.lifespan_class(self.config)
        await server.startup(sockets=[self._sock])
        self._server = server
        # main_loop only ticks (Date header, max-requests); it returns once should_exit is set.
        self._ticker = asyncio.create_task(server.main_loop())

    async def aclose(self) -> None:
        """Stop accepting, let open requests finish (uvicorn's graceful timeout), close."""
        server, self._server = self._server, None
        if server is None:
            return
        server.should_exit = True
        if self._ticker is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        await server.shutdown(sockets=[self._sock] if self._sock else None)
        if self._sock is not None:
            self._sock.close()
