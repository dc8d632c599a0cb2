"""Per-thread use counters on the Check path, swapped out by the reporter thread.

Each RPC thread owns a one-slot list holding its current dict (credential id → uses); a check
does ``counts[id] += 1`` with no lock. ``harvest`` puts a fresh dict in every slot and retires
the old ones; a retired dict is read only at the *next* harvest, one interval later, so an RPC
thread that fetched its dict just before the swap still lands its increment in a dict nobody
reads yet (no lost update, no "dict changed size" while summing). Memory is bounded: a thread
counts at most ``max_entries`` distinct credentials per interval; uses of others are counted as
dropped.

With the compiled Check path observing in C, every use — the ones it counts in C and the ones
the Python observers see (a token's first use, a rate-limited key) — goes to one store instead
(``use_store``, the C path's ``UsageCounts``): one ``max_entries`` bound per interval for the
whole sidecar, so both paths keep or drop exactly the same uses."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

from sidecar.authz.decision import Decision, Reason
from sidecar.authz.engine import CheckInput

# The credential authenticated (the request may still be refused for its route or rate):
# these are uses. A revoked, expired or unknown credential is not.
USED = frozenset(
    {
        Reason.OK,
        Reason.INSUFFICIENT_SCOPE,
        Reason.WORKSPACE_MISMATCH,
        Reason.NO_ROUTE,
        Reason.RATE_LIMITED,
    }
)


class UsageStore(Protocol):
    """Where a tally counts instead of its threads' dicts (``UsageTally.use_store``)."""

    @property
    def max_entries(self) -> int: ...

    @property
    def dropped(self) -> int:
        """Uses dropped since the last harvest."""
        ...

    def count(self, key: str, /) -> None:
        """One use of credential ``key``: dropped when ``max_entries`` others were counted
        since the last harvest."""

    def harvest(self) -> tuple[dict[str, int], int]:
        """The uses counted since the last harvest and how many were dropped; starts anew."""
        ...


class UsageTally:
    """``observe(decision, view, source, elapsed)`` for ``CheckHandler.observers`` (and the
    in-cluster API): counts a use of the API key, or of the OAuth grant of an access token."""

    def __init__(self, clock: Callable[[], float], max_entries: int = 50_000) -> None:
        self._clock = clock
        self._max = max_entries
        self._local = threading.local()
        self._slots: list[list[dict[str, int]]] = []
        self._retired: list[dict[str, int]] = []
        self._retired_at = clock()
        self._lock = threading.Lock()  # guards _slots (a thread's first use; harvests)
        self._dropped = 0  # written by RPC threads without a lock: approximate by design
        self._store: UsageStore | None = None

    @property
    def max_entries(self) -> int:
        return self._max

    @property
    def dropped(self) -> int:
        """Uses not counted: over the memory bound."""
        store = self._store
        return self._dropped + (store.dropped if store is not None else 0)

    @property
    def store(self) -> UsageStore | None:
        return self._store

    def use_store(self, store: UsageStore) -> None:
        """Count every use from now on in ``store`` (the compiled Check path's, which counts
        its own there too), under its ``max_entries``; harvests take its counts with what the
        threads counted before."""
        with self._lock:
            if self._store is not None and self._store is not store:
                raise RuntimeError("usage tally: already counting in another store")
            self._store = store

    def __call__(self, decision: Decision, view: CheckInput, source: str, elapsed: float) -> None:
        identity = decision.identity
        if identity is None or decision.reason not in USED:
            return
        key = identity.grant_id or identity.id  # an access token counts for its grant
        store = self._store
        if store is not None:
            store.count(key)
            return
        try:
            counts = self._local.slot[0]
        except AttributeError:
            counts = self._register()
        try:
            counts[key] += 1
        except KeyError:
            if len(counts) < self._max:
                counts[key] = 1
            else:
                self._dropped += 1

    def _register(self) -> dict[str, int]:
        slot: list[dict[str, int]] = [{}]
        self._local.slot = slot
        with self._lock:
            self._slots.append(slot)
        return slot[0]

    def harvest(self, *, final: bool = False) -> tuple[dict[str, int], float]:
        """Uses counted up to the previous harvest, summed over threads, and the time they
        were retired (each counted use happened before it). ``final`` (no RPC thread running
        any more) also takes the current counts."""
        now = self._clock()
        with self._lock:
            slots = list(self._slots)
            store = self._store
        retiring = []
        for slot in slots:
            retiring.append(slot[0])
            slot[0] = {}
        if store is not None:
            counts, dropped = store.harvest()
            retiring.append(counts)
            self._dropped += dropped
        ready, self._retired = self._retired, retiring
        at = self._retired_at
        self._retired_at = now
        if final:
            ready = ready + retiring
            self._retired = []
            at = now
        totals: dict[str, int] = {}
        for counts in ready:
            for key, uses in counts.items():
                totals[key] = totals.get(key, 0) + uses
        return totals, at
