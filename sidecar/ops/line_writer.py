"""Log lines written by a thread of their own, so the Check's RPC thread never formats or writes
one: a logged denial cost that thread ≈ 50-90 µs of CPU (a LogRecord, the JSON formatter, a
write and flush to stderr, which can block on a slow pipe), the p99 of the denials at 1,000
checks/s (docs/performance.md, "Denials' tail").

The RPC thread only appends a small tuple to a bounded queue (a deque: its append and popleft
are atomic under the GIL, so no lock is taken and nothing waits); a full queue refuses the line
and the caller counts it as dropped. The writer drains the queue every ``interval`` seconds and
on ``drain()``, in arrival order, one drainer at a time."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger("sidecar.logs")

Emit = Callable[[Any], None]


class _Call:
    """A queued call (a summary line), run in its turn after the lines queued before it."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn


class LineWriter:
    """Queue items for ``emit`` on the writer thread: ``put`` never blocks."""

    def __init__(self, emit: Emit, *, capacity: int = 4096, interval: float = 0.05) -> None:
        if capacity < 1 or interval <= 0:
            raise ValueError("a line writer needs a positive capacity and interval")
        self._emit = emit
        self._capacity = capacity
        self._interval = interval
        self._items: deque[Any] = deque()
        self._draining = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def put(self, item: Any) -> bool:
        """Queue ``item``; False (nothing queued) when the queue is full. Several RPC threads
        may each pass the length check at once, so the queue can exceed ``capacity`` by the
        number of RPC threads, never more."""
        items = self._items
        if len(items) >= self._capacity:
            return False
        items.append(item)
        return True

    def call_in_turn(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the writer after everything queued so far; never refused (the queue's
        owner calls it rarely: a summary every few seconds)."""
        self._items.append(_Call(fn))

    @property
    def running(self) -> bool:
        return self._thread is not None

    def drain(self) -> int:
        """Emit everything queued now, in order; returns how many. An ``emit`` that raises is
        logged and the rest still go out."""
        emitted = 0
        with self._draining:
            items = self._items
            while True:
                try:
                    item = items.popleft()
                except IndexError:
                    return emitted
                try:
                    if item.__class__ is _Call:
                        item.fn()
                    else:
                        self._emit(item)
                except Exception:
                    log.exception("log line not written")
                emitted += 1

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="spauth-log-writer", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.drain()

    def close(self) -> None:
        """Stop the thread and write what is still queued."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.drain()
