"""One structured log line per denied request, findable by its decision id (which the client
also gets, in ``x-statuspulse-decision-id`` and the JSON body).

A flood of random keys must not turn into a flood of log writes (each costs ~10-20 µs of CPU and
can block on a slow stderr pipe), so lines are rate-limited by a token bucket per class: denials
of a known credential (a key id or token subject to look up) and anonymous ones (missing,
malformed, unknown credential) have separate buckets, so an attack with garbage keys cannot
crowd out the lines about real keys. What is suppressed is counted and reported, by reason, in
one summary line at most every ``summary_interval`` seconds.

With ``background=True`` (the sidecar's setting) a line is written by a thread of its own
(``sidecar.ops.line_writer``): the RPC thread takes a token and queues a tuple, and the line, with
the time of the denial as its ``ts``, is built and written within ``LineWriter``'s interval. A
full queue drops the line; dropped lines are counted by reason and reported like suppressed ones,
in a summary line of their own.

Never logged: the credential, the query string (clients put keys there), other headers."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable

from sidecar.authz.decision import OUTCOMES, Decision, Outcome, Reason
from sidecar.authz.engine import CheckInput
from sidecar.ops.line_writer import LineWriter
from sidecar.ops.metrics import OUTCOME_LABEL

log = logging.getLogger("sidecar.decisions")
_ALLOWED = frozenset(r for r in Reason if OUTCOMES[r] is Outcome.ALLOW)
_KEYLIKE = re.compile(r"spk_[0-9A-Za-z]+")
MAX_PATH = 256


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; rate 0 means unlimited."""

    def __init__(
        self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(rate, 1.0)
        self._tokens = self.burst
        self._clock = clock
        self._last = clock()
        self._lock = threading.Lock()

    def take(self) -> bool:
        if not self.rate:
            return True
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False


def safe_path(path: str) -> str:
    """The path without its query string, truncated, with anything key-shaped masked."""
    path = path.partition("?")[0][:MAX_PATH]
    return _KEYLIKE.sub("spk_<redacted>", path) if "spk_" in path else path


# A line to write: the decision, the request's method and path, the source, and the wall-clock
# time of the denial (None: now).
Line = tuple[Decision, str, str, str, float | None]


class DenialLog:
    """A Check observer that logs denials; ``flush()`` reports suppressed and dropped lines.
    With ``background`` the lines are written by ``writer`` (start it with ``start()``, stop it
    with ``close()``); otherwise on the calling thread."""

    def __init__(
        self,
        rate: float = 100.0,
        *,
        summary_interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        background: bool = False,
        capacity: int = 4096,
    ) -> None:
        self._known = TokenBucket(rate, clock=clock)
        self._anonymous = TokenBucket(rate, clock=clock)
        self._suppressed: Counter[str] = Counter()
        self._dropped: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._clock = clock
        self._interval = summary_interval
        self._last_summary = clock()
        self.writer = LineWriter(self._write, capacity=capacity) if background else None

    def __call__(self, decision: Decision, request: CheckInput, source: str, _t: float) -> None:
        if decision.reason in _ALLOWED:
            return
        self.deny(decision, request.method, request.path, source)

    def deny(self, decision: Decision, method: str, path: str, source: str) -> None:
        """Log one denial (rate-limited). The compiled Check path calls this directly for the
        denials it observes in C, with the request fields a line names."""
        if not (self._known if decision.identity is not None else self._anonymous).take():
            with self._lock:
                self._suppressed[decision.reason.value] += 1
            return
        writer = self.writer
        if writer is None:
            self._write((decision, method, path, source, None))
        elif not writer.put((decision, method, path, source, time.time())):
            with self._lock:
                self._dropped[decision.reason.value] += 1

    def start(self) -> None:
        if self.writer is not None:
            self.writer.start()

    def close(self) -> None:
        """Write the lines still queued, stop the writer, and report what was suppressed."""
        if self.writer is not None:
            self.writer.close()
        self.flush(force=True)

    def _write(self, line: Line) -> None:
        decision, method, path, source, created = line
        if not log.isEnabledFor(logging.INFO):
            return
        ident = decision.identity
        fields: dict[str, object] = {
            "decision_id": decision.decision_id,
            "reason": decision.reason.value,
            "outcome": OUTCOME_LABEL[decision.outcome],
            "http_status": decision.http_status,
            "method": method,
            "path": safe_path(path),
            "source": source,
        }
        if ident is not None:
            fields["workspace"] = ident.workspace
            if ident.kind == "api_key":
                fields["key_id"] = ident.id
            else:
                fields.update(subject=ident.subject, client_id=ident.client_id, token_id=ident.id)
        if decision.detail:
            fields["detail"] = decision.detail
        if created is None:
            log.info("request denied", extra=fields)
            return
        record = log.makeRecord(
            log.name, logging.INFO, __file__, 0, "request denied", (), None, extra=fields
        )
        # Stamped with the time of the denial, not of the write (as LogRecord stamps it).
        record.relativeCreated -= (record.created - created) * 1000
        record.created = created
        record.msecs = int((created - int(created)) * 1000) + 0.0
        log.handle(record)

    def flush(self, force: bool = False) -> int:
        """Log how many lines were suppressed (rate limit) and dropped (writer queue full)
        since the last summary, after the lines queued so far; return their sum. With the
        writer running the summary is queued behind those lines, so the caller (housekeeping)
        never waits for a write."""
        now = self._clock()
        if not force and now - self._last_summary < self._interval:
            return 0
        with self._lock:
            counts, self._suppressed = self._suppressed, Counter()
            dropped, self._dropped = self._dropped, Counter()
            self._last_summary = now
        total, lost = sum(counts.values()), sum(dropped.values())
        if total or lost:
            writer = self.writer
            if writer is not None and writer.running:
                writer.call_in_turn(lambda: _summaries(total, counts, lost, dropped))
            else:
                if writer is not None:
                    writer.drain()
                _summaries(total, counts, lost, dropped)
        return total + lost


def _summaries(total: int, counts: Counter[str], lost: int, dropped: Counter[str]) -> None:
    if total:
        log.warning(
            "denial log lines suppressed (rate limit)",
            extra={"suppressed": total, "by_reason": dict(counts)},
        )
    if lost:
        log.warning(
            "denial log lines dropped (writer queue full)",
            extra={"dropped": lost, "by_reason": dict(dropped)},
        )
