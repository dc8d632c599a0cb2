"""Limits on the HTTP port that uvicorn does not have: a deadline to receive a request's headers,
another to receive its body, and a cap on open connections. Without them a client trickling one
byte at a time holds a connection (and its memory) forever, and a thousand of them hold the
port. A client that goes away mid-request is an info line, not an error with a traceback.

``guarded_protocol(limits)`` is a uvicorn h11 protocol class with the limits; ``quiet_disconnects``
wraps the ASGI app."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("sidecar.http")


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Seconds to receive a request's headers, then its body; open connections at most."""

    read_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 512


_HEADERS, _BODY, _DONE = "headers", "body", "done"


def guarded_protocol(limits: HttpLimits) -> type[H11Protocol]:
    """An h11 protocol class enforcing ``limits`` (one class per server: uvicorn instantiates
    the class it is given for every connection)."""

    class GuardedH11Protocol(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._phase = ""
            self._deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                log.info(
                    "http connection refused: too many open",
                    extra={"limit": limits.max_connections, "client": _client(self.client)},
                )
                transport.close()
                return
            self._arm(_HEADERS)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._follow()

        def handle_events(self) -> None:
            super().handle_events()
            self._follow()

        def connection_lost(self, exc: Exception | None) -> None:
            self._arm("")
            super().connection_lost(exc)

        def _follow(self) -> None:
            """Which part of a request is awaited now, and its deadline."""
            cycle = self.cycle
            if cycle is None or cycle.response_complete:
                # Between requests the keep-alive timer runs; once bytes of the next request
                # arrive (data_received), its headers must follow in time.
                if self.timeout_keep_alive_task is None:
                    self._arm(_HEADERS)
            elif cycle.more_body:
                self._arm(_BODY)
            else:
                self._arm(_DONE)

        def _arm(self, phase: str) -> None:
            if phase == self._phase:
                return
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            self._phase = phase
            timeout = {_HEADERS: limits.read_timeout, _BODY: limits.body_timeout}.get(phase)
            if timeout is not None:
                self._deadline = self.loop.call_later(timeout, self._expired)

        def _expired(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            log.info(
                "http request too slow; connection closed",
                extra={"waiting_for": self._phase, "client": _client(self.client)},
            )
            self.transport.close()

    return GuardedH11Protocol


def quiet_disconnects(app: ASGIApp) -> ASGIApp:
    """``app``, with a client that went away mid-request logged at info: nothing is wrong on
    our side, and there is no one left to answer."""

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await app(scope, receive, send)
        except ClientDisconnect:
            log.info(
                "http client disconnected before its request was read",
                extra={"path": scope.get("path", ""), "client": _client(scope.get("client"))},
            )

    return guarded


def _client(peer: object) -> str:
    if isinstance(peer, tuple | list) and len(peer) == 2:
        return f"{peer[0]}:{peer[1]}"
    return ""
