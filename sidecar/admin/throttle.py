"""Refused keys counted per source address on the admin API (gRPC and HTTP alike): an address
that presents too many unknown, malformed, expired or revoked keys within the window is refused
with ``RateLimited`` (gRPC RESOURCE_EXHAUSTED, HTTP 429 + Retry-After) until the window slides,
whatever it presents — the sidecar's rule for Check requests, with the same limiter, so a stolen
or guessed key list cannot be tried at full speed against the admin port either."""

from __future__ import annotations

import math

from sidecar.admin.rpc import Authenticator, SourceAware
from sidecar.authz.ratelimit import RateLimiter
from sidecar.core.clock import Clock
from sidecar.core.errors import RateLimited, Unauthenticated
from sidecar.core.models import Principal


def source_host(peer: str) -> str:
    """The address of a peer without its port: gRPC's ``ipv4:1.2.3.4:5678`` or
    ``ipv6:[::1]:5678``, or an HTTP client's host as is."""
    kind, sep, rest = peer.partition(":")
    if not sep or kind not in ("ipv4", "ipv6"):
        return peer
    host = rest.rpartition(":")[0]
    return host.strip("[]") or rest


class FailureThrottle(SourceAware):
    """An ``Authenticator`` that counts refused keys per source in ``limiter`` (the sidecar's
    ``WindowRateLimiter``, built with the limit and ``window`` by the control plane), or only
    authenticates when ``limiter`` is None (the limit is off)."""

    def __init__(
        self, inner: Authenticator, clock: Clock, limiter: RateLimiter | None, window: float
    ) -> None:
        self._inner = inner
        self._clock = clock
        self._limiter = limiter
        self._retry_after = max(1, math.ceil(window))

    def authenticate(self, secret: str, source: str = "") -> Principal:
        host = source_host(source)
        now = self._clock.now()
        limiter = self._limiter
        if limiter is not None and host and limiter.source_blocked(host, now):
            raise RateLimited(
                "too many refused API keys from this address; try again later",
                self._retry_after,
            )
        try:
            return self._inner.authenticate(secret)
        except Unauthenticated:
            # A request without any key is not an attempt (as on the sidecar).
            if limiter is not None and host and secret:
                limiter.failed(host, "", now)
            raise
