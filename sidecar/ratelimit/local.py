"""The in-memory RateLimiter: sliding windows per source address, per key id and per limited key,
kept by each sidecar process. The Check path for valid traffic only reads two dicts of blocked
names (no lock); the lock is taken when a credential fails and for keys that carry a rate limit.

When a sync (``sidecar.ratelimit.shared``) feeds it, the limiter also keeps the events it has not
yet pushed (``pending``) and a shared view per name read back from Redis; a name's count is then
the larger of its local count and shared + pending, so a Redis that lost its data never lowers
what this process enforces on its own."""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

from sidecar.ratelimit.window import BucketWindow

SOURCE = "source"
KEY = "key"
RATE = "rate"


@dataclass(frozen=True, slots=True)
class AbuseLimits:
    """Failed-credential limits per ``failure_window`` seconds (0 turns one off); windows slide
    in ``buckets`` steps; at most ``max_tracked`` names are remembered per kind."""

    source_failures: int = 50
    key_failures: int = 20
    failure_window: float = 60.0
    buckets: int = 10
    max_tracked: int = 100_000


@dataclass(slots=True)
class Counter:
    """One name's windows: its own events, those not yet shared, and the shared view."""

    local: BucketWindow
    pending: dict[int, int] = field(default_factory=dict)
    shared: BucketWindow | None = None


@dataclass(frozen=True, slots=True)
class Delta:
    """Events of one name to push: bucket index -> count, and the window they belong to."""

    scope: str
    name: str
    width: float
    oldest: int
    counts: dict[int, int]


class WindowRateLimiter:
    """Implements ``sidecar.authz.ratelimit.RateLimiter``."""

    def __init__(self, limits: AbuseLimits | None = None, *, sharing: bool = False) -> None:
        self.limits = limits or AbuseLimits()
        self.sharing = sharing
        self.shared_until = 0.0  # shared views count until then (a sync moves it forward)
        self._lock = threading.Lock()
        self._tables: dict[str, dict[str, Counter]] = {SOURCE: {}, KEY: {}, RATE: {}}
        self._blocked_sources: dict[str, float] = {}
        self._blocked_keys: dict[str, float] = {}
        self._dirty: dict[tuple[str, str], None] = {}
        self._new_blocks: list[tuple[str, str, float]] = []

    # -- the Check path -----------------------------------------------------------------------

    def source_blocked(self, source: str, now: float) -> bool:
        blocked = self._blocked_sources
        if not blocked:
            return False
        until = blocked.get(source)
        return until is not None and now < until

    def blocked_tables(self) -> tuple[dict[str, float], dict[str, float]]:
        """The blocked sources and key ids (name -> until), for the compiled Check path, which
        reads them as ``source_blocked`` and ``key_blocked`` do (a check from a blocked source
        or with a blocked key goes to the Python path). The same two dicts for the limiter's
        life: they are only ever changed in place."""
        return self._blocked_sources, self._blocked_keys

    def key_blocked(self, key_id: str, now: float) -> bool:
        blocked = self._blocked_keys
        if not blocked:
            return False
        until = blocked.get(key_id)
        return until is not None and now < until

    def failed(self, source: str, key_id: str, now: float) -> None:
        limits = self.limits
        with self._lock:
            for scope, name, limit in (
                (SOURCE, source, limits.source_failures),
                (KEY, key_id, limits.key_failures),
            ):
                if name and limit > 0:
                    counter = self._counter(scope, name, limits.failure_window, now)
                    self._count(scope, name, counter, now)
                    self._maybe_block(scope, name, counter, limit, now)

    def admit(self, key_id: str, limit: int, period: int, now: float) -> bool:
        with self._lock:
            counter = self._counter(RATE, key_id, float(period), now)
            if self._estimate(counter, now) >= limit:
                return False
            self._count(RATE, key_id, counter, now)
            return True

    # -- counting ---------------------------------------------------------------------------------

    def _counter(self, scope: str, name: str, span: float, now: float) -> Counter:
        table = self._tables[scope]
        counter = table.pop(name, None)  # re-inserted last: the table is in least-recent order
        if counter is None or counter.local.span != span:
            if len(table) >= self.limits.max_tracked:
                self._evict(table)
            counter = Counter(BucketWindow(span, self.limits.buckets))
        table[name] = counter
        return counter

    def _count(self, scope: str, name: str, counter: Counter, now: float) -> None:
        k = counter.local.add(now)
        if self.sharing:
            counter.pending[k] = counter.pending.get(k, 0) + 1
            self._dirty[(scope, name)] = None

    def _estimate(self, counter: Counter, now: float) -> int:
        local = counter.local.total(now)
        if counter.shared is None or now >= self.shared_until:
            return local
        oldest = counter.local.oldest(now)
        pending = sum(n for k, n in counter.pending.items() if k >= oldest)
        return max(local, counter.shared.total(now) + pending)

    def _maybe_block(
        self, scope: str, name: str, counter: Counter, limit: int, now: float, *, share: bool = True
    ) -> None:
        if self._estimate(counter, now) < limit:
            return
        until = counter.local.reopen_at(now, limit)
        if counter.shared is not None and now < self.shared_until:
            oldest = counter.local.oldest(now)
            pending = sum(n for k, n in counter.pending.items() if k >= oldest)
            until = max(until, counter.shared.reopen_at(now, max(1, limit - pending)))
        if until > now:
            self._block(scope, name, until, now)
            if share and self.sharing:
                self._new_blocks.append((scope, name, until))

    def _block(self, scope: str, name: str, until: float, now: float) -> None:
        blocked = self._blocked_sources if scope == SOURCE else self._blocked_keys
        if len(blocked) >= self.limits.max_tracked:
            for stale in [n for n, t in blocked.items() if t <= now]:
                del blocked[stale]
        if until > blocked.get(name, 0.0):
            blocked[name] = until

    def _evict(self, table: dict[str, Counter]) -> None:
        """Forget the tenth of the names counted least recently (no scan: the table is kept in
        least-recent order), so a flood of new names costs O(1) per name."""
        for name in list(itertools.islice(table, max(1, self.limits.max_tracked // 10))):
            del table[name]

    # -- sharing (called by the sync thread) -----------------------------------------------------

    def drain(self, now: float) -> list[Delta]:
        """Take the events not yet pushed, and every rate-limited key still in its window (to
        read its shared count back)."""
        with self._lock:
            deltas: list[Delta] = []
            seen: set[tuple[str, str]] = set()
            for scope, name in self._dirty:
                counter = self._tables[scope].get(name)
                if counter is not None:
                    deltas.append(self._take(scope, name, counter, now))
                    seen.add((scope, name))
            self._dirty = {}
            for name, counter in self._tables[RATE].items():
                if (RATE, name) not in seen and counter.local.total(now) > 0:
                    deltas.append(self._take(RATE, name, counter, now))
            return deltas

    def take_blocks(self) -> list[tuple[str, str, float]]:
        """The blocks decided here since the last call (scope, name, until), to publish."""
        with self._lock:
            blocks, self._new_blocks = self._new_blocks, []
            return blocks

    @staticmethod
    def _take(scope: str, name: str, counter: Counter, now: float) -> Delta:
        window = counter.local
        oldest = window.oldest(now)
        counts = {k: n for k, n in counter.pending.items() if k >= oldest}
        counter.pending = {}
        return Delta(scope, name, window.width, oldest, counts)

    def restore(
        self, deltas: list[Delta], blocks: list[tuple[str, str, float]] | None = None
    ) -> None:
        """Put back what a failed push took, to push it with the next one."""
        with self._lock:
            for delta in deltas:
                counter = self._tables[delta.scope].get(delta.name)
                if counter is None or not delta.counts:
                    continue
                for k, n in delta.counts.items():
                    counter.pending[k] = counter.pending.get(k, 0) + n
                self._dirty[(delta.scope, delta.name)] = None
            self._new_blocks[:0] = blocks or []

    def absorb(
        self,
        views: list[tuple[Delta, dict[int, int]]],
        blocked: dict[str, dict[str, float]],
        now: float,
        fresh_for: float,
    ) -> None:
        """Take the shared counts read back after a push, and the blocks other processes
        decided; shared views count for ``fresh_for`` seconds unless a newer sync renews them."""
        limits = self.limits
        with self._lock:
            self.shared_until = now + fresh_for
            for delta, buckets in views:
                counter = self._tables[delta.scope].get(delta.name)
                if counter is None:
                    continue
                if counter.shared is None:
                    counter.shared = BucketWindow(counter.local.span, counter.local.buckets)
                counter.shared.clear()
                for k, n in buckets.items():
                    counter.shared.set(k, n, now)
                if delta.scope != RATE:
                    limit = limits.source_failures if delta.scope == SOURCE else limits.key_failures
                    self._maybe_block(delta.scope, delta.name, counter, limit, now)
            for scope, entries in blocked.items():
                for name, until in entries.items():
                    if until > now:
                        self._block(scope, name, until, now)

    def forget_shared(self) -> None:
        """Stop counting shared views (Redis unreachable for too long): local limits only."""
        with self._lock:
            self.shared_until = 0.0
