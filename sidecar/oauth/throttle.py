"""Throttling of failed sign-ins, per account and per source address (NIST SP 800-63B §5.2.2:
limit consecutive failed attempts). A sliding window of failure times, in memory: each
control-plane process throttles on its own, which bounds guessing per process."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from sidecar.core.clock import Clock


@dataclass(frozen=True, slots=True)
class ThrottlePolicy:
    """How many failures within ``window`` seconds block further attempts."""

    per_account: int = 5
    per_source: int = 20
    window: int = 900
    max_tracked: int = 100_000


class SignInThrottle:
    """Failure windows keyed by account (workspace + e-mail) and by source address."""

    def __init__(self, clock: Clock, policy: ThrottlePolicy | None = None) -> None:
        self._clock = clock
        self.policy = policy or ThrottlePolicy()
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def retry_after(self, account: str, source: str) -> int:
        """Seconds until another attempt is allowed (0: allowed now)."""
        now = self._clock.now()
        with self._lock:
            waits = [
                self._wait(f"a:{account}", self.policy.per_account, now),
                self._wait(f"s:{source}", self.policy.per_source, now),
            ]
        return max(waits)

    def failed(self, account: str, source: str) -> None:
        now = self._clock.now()
        with self._lock:
            if len(self._failures) >= self.policy.max_tracked:
                self._prune(now)
            for key in (f"a:{account}", f"s:{source}"):
                self._failures.setdefault(key, deque()).append(now)

    def succeeded(self, account: str) -> None:
        """A correct password clears the account's failures (not the source's)."""
        with self._lock:
            self._failures.pop(f"a:{account}", None)

    def _wait(self, key: str, limit: int, now: float) -> int:
        times = self._failures.get(key)
        if not times:
            return 0
        while times and times[0] <= now - self.policy.window:
            times.popleft()
        if len(times) < limit:
            return 0
        return max(1, int(times[-limit] + self.policy.window - now) + 1)

    def _prune(self, now: float) -> None:
        cutoff = now - self.policy.window
        for key in [k for k, v in self._failures.items() if not v or v[-1] <= cutoff]:
            del self._failures[key]
