"""Reports harvested uses to the control plane every ``interval``, at least once.

A report, once sent, is frozen with its id: if the answer is lost it is resent unchanged, and
the control plane counts an id once. Uses harvested while a report is outstanding wait in the
next one (merged per credential and UTC day), so memory stays bounded by two reports of at
most ``max_entries`` entries each; uses of further credentials are counted as dropped. A sidecar
killed with ``kill -9`` loses what it had not reported (at most two intervals of counts, or
everything while the control plane was away); a graceful stop reports what is left."""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass

from sidecar.auditship.shipper import Backoff
from sidecar.core.usage import CredentialUse, UsageReport, UseKind, merge
from sidecar.usage.tally import UsageTally
from sidecar.usage.transport import UsageTransport, UsageTransportError

log = logging.getLogger("sidecar.usage")
API_KEY_PREFIX = "key_"


@dataclass(frozen=True, slots=True)
class ReporterStats:
    reported: int  # uses acknowledged by the control plane
    pending: int  # uses harvested, not yet acknowledged
    dropped: int  # uses not counted (memory bound) or refused by the control plane
    failures: int
    last_error: str


class UsageReporter:
    """Owns the reporter thread. ``start``/``close`` bracket the sidecar's life."""

    def __init__(
        self,
        tally: UsageTally,
        transport: UsageTransport,
        *,
        interval: float = 10.0,
        max_entries: int = 50_000,
        backoff: Backoff | None = None,
        clock: Callable[[], float],
    ) -> None:
        self.tally = tally
        self._transport = transport
        self._interval = interval
        self._max = max_entries
        self._backoff = backoff or Backoff(initial=interval, maximum=max(60.0, interval))
        self._clock = clock
        self._next: dict[tuple[str, int], CredentialUse] = {}
        self._outstanding: UsageReport | None = None
        self._retry_at = 0.0
        self._consecutive = 0
        self._reported = 0
        self._dropped = 0
        self._failures = 0
        self._last_error = ""
        self._lock = threading.Lock()  # poll() runs on the thread, and on close()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="usage-reporter", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.poll()
            except Exception:  # never let the thread die: counts would pile up unseen
                log.exception("usage report failed")

    def poll(self, *, final: bool = False) -> bool:
        """Harvest, then send the outstanding report unless a retry is pending; True when
        nothing is left to send."""
        with self._lock:
            self._absorb(*self.tally.harvest(final=final))
            if self._outstanding is None and self._next:
                uses = tuple(self._next.values())
                self._outstanding = UsageReport("use_" + secrets.token_hex(12), uses)
                self._next = {}
            if self._outstanding is None:
                return True
            if not final and self._clock() < self._retry_at:
                return False
            return self._send(self._outstanding)

    def _absorb(self, counts: dict[str, int], at: float) -> None:
        day_at = int(at)
        for credential_id, uses in counts.items():
            kind = (
                UseKind.API_KEY if credential_id.startswith(API_KEY_PREFIX) else UseKind.OAUTH_GRANT
            )
            use = CredentialUse(credential_id, kind, uses, day_at)
            key = (credential_id, use.day)
            seen = self._next.get(key)
            if seen is not None:
                self._next[key] = merge(seen, use)
            elif len(self._next) < self._max:
                self._next[key] = use
            else:
                self._dropped += uses

    def _send(self, report: UsageReport) -> bool:
        try:
            self._transport.send(report)
        except UsageTransportError as exc:
            if exc.rejected:
                log.error("usage report refused; dropped", extra={"error": str(exc)})
                self._dropped += sum(u.uses for u in report.uses)
                self._outstanding = None
                return not self._next
            self._consecutive += 1
            self._failures += 1
            self._last_error = str(exc)
            self._retry_at = self._clock() + self._backoff.delay(self._consecutive)
            if self._consecutive == 1:
                log.warning("usage report failed; will resend", extra={"error": str(exc)})
            return False
        self._reported += sum(u.uses for u in report.uses)
        self._outstanding = None
        self._consecutive = 0
        return not self._next

    def close(self) -> bool:
        """Stop the thread and report what is left (RPC threads have stopped): the outstanding
        report, then the next one, giving up at the first failure so a control plane that is
        away delays shutdown by one timeout at most. True when everything was acknowledged."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        done = False
        for _ in range(2):
            failures = self._failures
            done = self.poll(final=True)
            if done or self._failures > failures:
                break
        self._transport.close()
        return done

    def stats(self) -> ReporterStats:
        with self._lock:
            pending = sum(u.uses for u in self._next.values())
            if self._outstanding is not None:
                pending += sum(u.uses for u in self._outstanding.uses)
        return ReporterStats(
            self._reported,
            pending,
            self._dropped + self.tally.dropped,
            self._failures,
            self._last_error,
        )
