"""Commit listeners: callbacks told the head revision after a commit that appended changes, in
this process only (other control-plane replicas learn of it from the change bus, or within one
replication heartbeat). Both SQL stores keep their listeners here, so ``Store.subscribe`` is
written once."""

from __future__ import annotations

import threading
from collections.abc import Callable


class CommitListeners:
    """A thread-safe set of ``callback(revision)``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[int], None]] = []

    def subscribe(self, callback: Callable[[int], None]) -> Callable[[], None]:
        """Call ``callback`` after every commit that appended changes; returns the unsubscribe."""
        with self._lock:
            self._callbacks.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)

        return unsubscribe

    def notify(self, revision: int) -> None:
        with self._lock:
            callbacks = list(self._callbacks)
        for callback in callbacks:
            callback(revision)
