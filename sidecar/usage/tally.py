"""Per-thread use counters on the Check path, swapped out by the reporter thread.

Each RPC thread owns a one-slot list holding its current dict (credential id → uses); a check
does ``counts[id] += 1`` with no lock. ``harvest`` puts a fresh dict in every slot and retires
the old ones; a retired dict is read only at the *next* harvest, one interval later, so an RPC
thread that fetched its dict just before the swap still lands its increment in a dict nobody
reads yet (no lost update, no "dict changed size" while summing). Memory is bounded: a thread
counts at most ``max_entries`` distinct credentials per interval; uses of others are counted as
dropped."""

from __future__ import annotations

import threading
from collections.abc import Callable

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
        self._sources: list[Callable[[], tuple[dict[str, int], int]]] = []

    @property
    def max_entries(self) -> int:
        return self._max

    @property
    def dropped(self) -> int:
        """Uses not counted: over the memory bound."""
        return self._dropped

    def add_source(self, source: Callable[[], tuple[dict[str, int], int]]) -> None:
        """Uses counted elsewhere (the compiled Check path's, kept in C): each harvest takes
        ``source()`` — the uses since its last call and how many it dropped — with the
        threads' counts."""
        with self._lock:
            self._sources.append(source)

    def __call__(self, decision: Decision, view: CheckInput, source: str, elapsed: float) -> None:
        identity = decision.identity
        if identity is None or decision.reason not in USED:
            return
        key = identity.grant_id or identity.id  # an access token counts for its grant
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
            sources = list(self._sources)
        retiring = []
        for slot in slots:
            retiring.append(slot[0])
            slot[0] = {}
        for source in sources:
            counts, dropped = source()
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
