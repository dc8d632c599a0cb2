"""Abuse limits as the engine sees them: a ``RateLimiter`` it consults on every check.
Implementations live in ``sidecar.ratelimit`` (in-memory, optionally shared through Redis); the
core only states what it asks and which denials count as failed credential attempts."""

from __future__ import annotations

from typing import Protocol

from sidecar.authz.decision import OUTCOMES, Outcome, Reason

# A failed credential attempt: a credential was presented and refused. A request without any
# credential is not an attempt (browsers and health probes send those), and a 403 is a
# credential that works but does not reach the route: counting those would let a client's bug
# (asking for a workspace it lacks) lock its own valid key out.
CREDENTIAL_FAILURES = frozenset(
    r
    for r in Reason
    if OUTCOMES[r] is Outcome.UNAUTHENTICATED and r is not Reason.MISSING_CREDENTIAL
)


class RateLimiter(Protocol):
    """Sliding-window limits on failed credentials (per source address and per key id) and on
    requests per key. Every method runs on the Check path: no I/O, no waiting."""

    def source_blocked(self, source: str, now: float) -> bool:
        """Whether ``source`` has failed too often and is refused for now."""
        ...

    def key_blocked(self, key_id: str, now: float) -> bool:
        """Whether credential ``key_id`` has failed too often and is refused for now."""
        ...

    def failed(self, source: str, key_id: str, now: float) -> None:
        """Count one failed credential attempt against ``source`` and ``key_id``; either may be
        '' (an unknown key names no key id; the in-cluster API knows no source)."""
        ...

    def admit(self, key_id: str, limit: int, period: int, now: float) -> bool:
        """Count one request of ``key_id`` against ``limit`` per ``period`` seconds; False when
        the key is over its limit (the request is then not counted)."""
        ...
