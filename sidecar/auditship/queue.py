"""The bounded in-memory queue between the Check path and the spool writer.

``put`` never waits for I/O: it takes a lock for a few dict-and-deque operations and returns.
When the queue is full, allow records are dropped first (the newest allow is refused, or the
oldest queued allow makes room for a denial); denials are kept up to a separate, larger bound
(``capacity * deny_headroom``) that only a stalled disk can reach. Every drop is counted.
"""

from __future__ import annotations

import heapq
import itertools
import random
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from sidecar.auditship.records import PendingDecision
from sidecar.core.audit import AUTHZ_ALLOW, AuditEvent

Item = AuditEvent | PendingDecision


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Counters since start: records accepted, dropped (by kind) and not sampled."""

    depth: int
    accepted: int
    dropped_allows: int
    dropped_denials: int
    sampled_out: int


class AuditQueue:
    """Bounded, non-blocking, order-preserving; allow records are sacrificed before denials."""

    def __init__(
        self,
        capacity: int,
        *,
        deny_headroom: int = 4,
        allow_sample_rate: float = 1.0,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity: must be at least 1")
        if not 0.0 <= allow_sample_rate <= 1.0:
            raise ValueError("allow_sample_rate: must be between 0 and 1")
        self.capacity = capacity
        self.deny_limit = capacity * max(1, deny_headroom)
        self.allow_sample_rate = allow_sample_rate
        self._rand = rand
        self._lock = threading.Lock()
        self._allows: deque[tuple[int, Item]] = deque()
        self._denies: deque[tuple[int, Item]] = deque()
        self._order = itertools.count()
        self._accepted = 0
        self._dropped_allows = 0
        self._dropped_denials = 0
        self._sampled_out = 0

    def keep_allow(self) -> bool:
        """Draw for one allow record: False means sampled out (and counted). Callers that draw
        before building a record save building the ones they drop."""
        if self.allow_sample_rate >= 1.0 or self._rand() < self.allow_sample_rate:
            return True
        with self._lock:
            self._sampled_out += 1
        return False

    def put(self, ev: AuditEvent, *, sampled: bool = False) -> bool:
        """Queue ``ev`` without blocking; False when it was dropped or sampled out.
        ``sampled``: the caller already drew ``keep_allow()`` for it."""
        if ev.action == AUTHZ_ALLOW:
            if not sampled and not self.keep_allow():
                return False
            return self._put_allow(ev)
        return self._put_deny(ev)  # denials and anything else are never sampled

    def put_pending(self, pending: PendingDecision, allowed: bool) -> bool:
        """Queue a decision whose record is built when drained (the caller drew
        ``keep_allow()`` already for an allow); False when dropped."""
        return self._put_allow(pending) if allowed else self._put_deny(pending)

    def _put_allow(self, ev: Item) -> bool:
        with self._lock:
            if len(self._allows) + len(self._denies) >= self.capacity:
                self._dropped_allows += 1
                return False
            self._allows.append((next(self._order), ev))
            self._accepted += 1
        return True

    def _put_deny(self, ev: Item) -> bool:
        with self._lock:
            if len(self._allows) + len(self._denies) >= self.capacity:
                if self._allows:
                    self._allows.popleft()  # the oldest allow makes room
                    self._dropped_allows += 1
                    self._accepted -= 1
                elif len(self._denies) >= self.deny_limit:
                    self._dropped_denials += 1
                    return False
            self._denies.append((next(self._order), ev))
            self._accepted += 1
        return True

    def drain(self) -> list[AuditEvent]:
        """Everything queued, in the order it was accepted, as events (queued decisions become
        their records here, on the draining thread)."""
        return [ev.event() if isinstance(ev, PendingDecision) else ev for ev in self.drain_items()]

    def drain_items(self) -> list[Item]:
        """Everything queued, in the order it was accepted, as queued (the lock is held only
        for a swap)."""
        with self._lock:
            if not self._allows and not self._denies:
                return []
            allows, self._allows = self._allows, deque()
            denies, self._denies = self._denies, deque()
        return [ev for _, ev in heapq.merge(allows, denies, key=lambda item: item[0])]

    @property
    def depth(self) -> int:
        return len(self._allows) + len(self._denies)

    def stats(self) -> QueueStats:
        with self._lock:
            return QueueStats(
                depth=len(self._allows) + len(self._denies),
                accepted=self._accepted,
                dropped_allows=self._dropped_allows,
                dropped_denials=self._dropped_denials,
                sampled_out=self._sampled_out,
            )
