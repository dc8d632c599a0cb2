"""The bounded in-memory queue between the Check path and the spool writer.

``put`` never waits for I/O. When the queue is full, allow records are dropped first (the newest
allow is refused, or the oldest queued allow makes room for a denial); denials are kept up to a
separate, larger bound (``capacity * deny_headroom``) that only a stalled disk can reach. Every
drop is counted.

The records themselves sit in a store: ``DequeStore`` here (a lock and two deques), or, when the
compiled Check path runs, its C ``AuditBuffer`` (sidecar/dataplane/_fastcheck.c, installed with
``use_store``), which keeps the same rules under the GIL and also holds the decision records the
C path encoded itself, as bytes. tests/test_audit_queue_store.py runs both on the same puts.
"""

from __future__ import annotations

import heapq
import itertools
import random
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sidecar.auditship.codec import decode
from sidecar.auditship.records import PendingDecision
from sidecar.core.audit import AUTHZ_ALLOW, AuditEvent

# A queued record: an event, a decision whose record the writer builds, or a record's spool
# payload already encoded (by the compiled Check path).
Item = AuditEvent | PendingDecision | bytes


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Counters since start: records accepted, dropped (by kind) and not sampled."""

    depth: int
    accepted: int
    dropped_allows: int
    dropped_denials: int
    sampled_out: int


class QueueStore(Protocol):
    """Where queued records wait, with the capacity rules above and their counters."""

    def put(self, item: Item, allowed: bool, /) -> bool:
        """Queue ``item``; False when it was dropped (counted)."""

    def drain(self) -> list[tuple[Item, bool]]:
        """Everything queued as (item, allowed), in the order accepted."""

    def counts(self) -> tuple[int, int, int, int]:
        """(depth, accepted, dropped allows, dropped denials)."""


class DequeStore:
    """The pure-Python store: two deques under a lock, merged in order when drained."""

    def __init__(self, capacity: int, deny_limit: int) -> None:
        self.capacity = capacity
        self.deny_limit = deny_limit
        self._lock = threading.Lock()
        self._allows: deque[tuple[int, Item]] = deque()
        self._denies: deque[tuple[int, Item]] = deque()
        self._order = itertools.count()
        self._accepted = 0
        self._dropped_allows = 0
        self._dropped_denials = 0

    def put(self, item: Item, allowed: bool, /) -> bool:
        return self._put_allow(item) if allowed else self._put_deny(item)

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

    def drain(self) -> list[tuple[Item, bool]]:
        with self._lock:  # held only for a swap
            if not self._allows and not self._denies:
                return []
            allows, self._allows = self._allows, deque()
            denies, self._denies = self._denies, deque()
        tagged = heapq.merge(
            ((n, ev, True) for n, ev in allows),
            ((n, ev, False) for n, ev in denies),
            key=lambda item: item[0],
        )
        return [(ev, allowed) for _, ev, allowed in tagged]

    def counts(self) -> tuple[int, int, int, int]:
        with self._lock:
            return (
                len(self._allows) + len(self._denies),
                self._accepted,
                self._dropped_allows,
                self._dropped_denials,
            )


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
        self._store: QueueStore = DequeStore(self.capacity, self.deny_limit)
        self._sampled_out = 0

    @property
    def store(self) -> QueueStore:
        return self._store

    def use_store(self, store: QueueStore) -> None:
        """Keep records in ``store`` from now on (before the first record is queued)."""
        if self._store.counts() != (0, 0, 0, 0):
            raise RuntimeError("audit queue: the store can change only before the first record")
        self._store = store

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
            return self._store.put(ev, True)
        return self._store.put(ev, False)  # denials and anything else are never sampled

    def put_pending(self, pending: PendingDecision, allowed: bool) -> bool:
        """Queue a decision whose record is built when drained (the caller drew
        ``keep_allow()`` already for an allow); False when dropped."""
        return self._store.put(pending, allowed)

    def drain(self) -> list[AuditEvent]:
        """Everything queued, in the order it was accepted, as events (queued decisions become
        their records here, on the draining thread)."""
        return [_event(item) for item, _ in self.drain_items()]

    def drain_items(self) -> list[tuple[Item, bool]]:
        """Everything queued, in the order it was accepted, as (item, allowed)."""
        return self._store.drain()

    def drain_frames(self) -> tuple[bytes, int] | None:
        """Everything queued as the spool's frames and how many records, in one call, when the
        store can (the C ``AuditBuffer`` holding only records the C path encoded, 64 KiB in
        all at most); None, draining nothing, otherwise: ``drain_items`` then."""
        drain = getattr(self._store, "drain_frames", None)
        if drain is None:
            return None
        framed: tuple[bytes, int] | None = drain()
        return framed

    @property
    def depth(self) -> int:
        return self._store.counts()[0]

    def stats(self) -> QueueStats:
        depth, accepted, dropped_allows, dropped_denials = self._store.counts()
        return QueueStats(
            depth=depth,
            accepted=accepted,
            dropped_allows=dropped_allows,
            dropped_denials=dropped_denials,
            sampled_out=self._sampled_out,
        )


def _event(item: Item) -> AuditEvent:
    if isinstance(item, PendingDecision):
        return item.event()
    if isinstance(item, bytes):
        return decode(item)
    return item
