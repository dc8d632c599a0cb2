"""Throttling of failed sign-ins (NIST SP 800-63B §5.2.2: limit consecutive failed attempts),
built so that it cannot be turned against a member.

- Per account *and source together*: after ``free_failures`` wrong passwords for one account
  from one source address, that pair waits a short, doubling backoff (1 s, 2 s, 4 s … at most
  ``max_backoff``). Someone who knows a member's e-mail address slows only their own attempts;
  the member, from another address, signs in as usual.
- Per source: at most ``per_source`` failures within ``window`` from one address, whatever the
  accounts, so one address cannot spray guesses across members.

Behind a proxy, the source is the client's address from ``X-Forwarded-For`` when the peer is a
trusted proxy (``trusted_proxies``, sidecar/http/client_address.py); otherwise every client
would share the proxy's address. In memory: each control-plane process throttles on its own."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from sidecar.core.clock import Clock


@dataclass(frozen=True, slots=True)
class ThrottlePolicy:
    """Backoff per (account, source) and a sliding window per source."""

    free_failures: int = 5
    max_backoff: int = 60
    per_source: int = 50
    window: int = 900
    max_tracked: int = 100_000


@dataclass(slots=True)
class _Streak:
    failures: int
    last: float


class SignInThrottle:
    """Failure streaks keyed by (account, source) and failure windows keyed by source."""

    def __init__(self, clock: Clock, policy: ThrottlePolicy | None = None) -> None:
        self._clock = clock
        self.policy = policy or ThrottlePolicy()
        self._streaks: dict[tuple[str, str], _Streak] = {}
        self._sources: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def retry_after(self, account: str, source: str) -> int:
        """Seconds until another attempt is allowed (0: allowed now)."""
        now = self._clock.now()
        with self._lock:
            return max(self._pair_wait(account, source, now), self._source_wait(source, now))

    def failed(self, account: str, source: str) -> None:
        now = self._clock.now()
        with self._lock:
            if len(self._streaks) + len(self._sources) >= self.policy.max_tracked:
                self._prune(now)
            streak = self._streaks.get((account, source))
            if streak is None or now - streak.last > self.policy.window:
                self._streaks[(account, source)] = _Streak(1, now)
            else:
                streak.failures += 1
                streak.last = now
            self._sources.setdefault(source, deque()).append(now)

    def succeeded(self, account: str, source: str) -> None:
        """A correct password ends the pair's streak (not the source's window)."""
        with self._lock:
            self._streaks.pop((account, source), None)

    def _pair_wait(self, account: str, source: str, now: float) -> int:
        streak = self._streaks.get((account, source))
        if streak is None or streak.failures < self.policy.free_failures:
            return 0
        backoff = min(2 ** (streak.failures - self.policy.free_failures), self.policy.max_backoff)
        wait = streak.last + backoff - now
        return max(0, int(wait) + (1 if wait > int(wait) else 0))

    def _source_wait(self, source: str, now: float) -> int:
        times = self._sources.get(source)
        if not times:
            return 0
        while times and times[0] <= now - self.policy.window:
            times.popleft()
        if len(times) < self.policy.per_source:
            return 0
        return max(1, int(times[-self.policy.per_source] + self.policy.window - now) + 1)

    def _prune(self, now: float) -> None:
        cutoff = now - self.policy.window
        for pair in [p for p, s in self._streaks.items() if s.last <= cutoff]:
            del self._streaks[pair]
        for source in [k for k, v in self._sources.items() if not v or v[-1] <= cutoff]:
            del self._sources[source]
