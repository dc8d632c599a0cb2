"""One structured log line per denied request, findable by its decision id (which the client
also gets, in ``x-statuspulse-decision-id`` and the JSON body).

A flood of random keys must not turn into a flood of log writes (each costs ~10-20 µs of CPU and
can block on a slow stderr pipe), so lines are rate-limited by a token bucket per class: denials
of a known credential (a key id or token subject to look up) and anonymous ones (missing,
malformed, unknown credential) have separate buckets, so an attack with garbage keys cannot
crowd out the lines about real keys. What is suppressed is counted and reported, by reason, in
one summary line at most every ``summary_interval`` seconds.

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


class DenialLog:
    """A Check observer that logs denials; ``flush()`` reports suppressed lines."""

    def __init__(
        self,
        rate: float = 100.0,
        *,
        summary_interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._known = TokenBucket(rate, clock=clock)
        self._anonymous = TokenBucket(rate, clock=clock)
        self._suppressed: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._clock = clock
        self._interval = summary_interval
        self._last_summary = clock()

    def __call__(self, decision: Decision, request: CheckInput, source: str, _t: float) -> None:
        if decision.reason in _ALLOWED:
            return
        ident = decision.identity
        if not (self._known if ident is not None else self._anonymous).take():
            with self._lock:
                self._suppressed[decision.reason.value] += 1
            return
        fields: dict[str, object] = {
            "decision_id": decision.decision_id,
            "reason": decision.reason.value,
            "outcome": OUTCOME_LABEL[decision.outcome],
            "http_status": decision.http_status,
            "method": request.method,
            "path": safe_path(request.path),
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
        log.info("request denied", extra=fields)

    def flush(self, force: bool = False) -> int:
        """Log how many lines were suppressed since the last summary; return that number."""
        now = self._clock()
        if not force and now - self._last_summary < self._interval:
            return 0
        with self._lock:
            counts, self._suppressed = self._suppressed, Counter()
            self._last_summary = now
        total = sum(counts.values())
        if total:
            log.warning(
                "denial log lines suppressed (rate limit)",
                extra={"suppressed": total, "by_reason": dict(counts)},
            )
        return total
