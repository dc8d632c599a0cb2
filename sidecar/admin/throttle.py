"""Refused keys counted per source address on the admin API (gRPC and HTTP alike): an address
that presents too many unknown, malformed, expired or revoked keys within the window is refused
with ``RateLimited`` (gRPC RESOURCE_EXHAUSTED, HTTP 429 + Retry-After) until the window slides,
whatever it presents — the sidecar's rule for Check requests, with the same limiter, so a stolen
or guessed key list cannot be tried at full speed against the admin port either."""

from __future__ import annotations

import math

from sidecar.admin.rpc import Authenticator, SourceAware
from sidecar.core.clock import Clock
from sidecar.core.errors import RateLimited, Unauthenticated
from sidecar.core.models import Principal
from sidecar.ratelimit.local import AbuseLimits, WindowRateLimiter


def source_host(peer: str) -> str:
    """The address of a peer without its port: gRPC's ``ipv4:1.2.3.4:5678`` or
    ``ipv6:[::1]:5678``, or an HTTP client's host as is."""
    kind, sep, rest = peer.partition(":")
    if not sep or kind not in ("ipv4", "ipv6"):
        return peer
    host = rest.rpartition(":")[0]
    return host.strip("[]") or rest


class FailureThrottle(SourceAware):
    """An ``Authenticator`` that counts refused keys per source (``limit`` per ``window`` s)."""

    def __init__(self, inner: Authenticator, clock: Clock, limit: int, window: float) -> None:
        self._inner = inner
        self._clock = clock
        self._enabled = limit > 0
        self._limiter = WindowRateLimiter(
            AbuseLimits(source_failures=limit, key_failures=0, failure_window=window)
        )
        self._retry_after = max(1, math.ceil(window))

    def authenticate(self, secret: str, source: str = "") -> Principal:
        host = source_host(source)
        now = self._clock.now()
        if self._enabled and host and self._limiter.source_blocked(host, now):
            raise RateLimited(
                "too many refused API keys from this address; try again later",
                self._retry_after,
            )
        try:
            return self._inner.authenticate(secret)
        except Unauthenticated:
            # A request without any key is not an attempt (as on the sidecar).
            if self._enabled and host and secret:
                self._limiter.failed(host, "", now)
            raise
