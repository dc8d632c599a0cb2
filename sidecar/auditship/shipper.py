"""Ships spooled records to the control plane: at-least-once, in spool order, one batch at a
time. A batch is acknowledged in the spool only after the control plane acknowledged every id
in it; a crash before that sends it again, and the control plane stores each id once."""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sidecar.auditship.codec import decode
from sidecar.auditship.spool import Spool, frame
from sidecar.auditship.transport import RecordsRefused, Transport, TransportError

log = logging.getLogger("sidecar.auditship")

# Records the control plane refused, kept as spool frames (sidecar.auditship.spool.frame) so an
# operator can read and re-send them: nothing is dropped silently.
DEAD_LETTER_FILE = "dead-letter"


@dataclass(frozen=True, slots=True)
class Backoff:
    """Retry delays: ``initial`` growing by ``multiplier`` up to ``maximum`` (a bound, so a
    returning control plane is used within ``maximum`` seconds), less a random fraction of up to
    ``jitter`` so sidecars that lost the control plane together do not retry in lockstep."""

    initial: float = 0.2
    maximum: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.5
    random: Callable[[], float] = field(default=random.random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError(
                f"backoff needs 0 < initial <= maximum, got {self.initial}, {self.maximum}"
            )
        if self.multiplier <= 1:
            raise ValueError(f"backoff multiplier must be > 1, got {self.multiplier}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"backoff jitter must be in [0, 1), got {self.jitter}")

    def delay(self, failures: int) -> float:
        """The wait after the ``failures``-th failure in a row (any count, even 10**6)."""
        # The exponent stops where the delay reaches the maximum: past it a power only grows
        # towards a float OverflowError (2.0 ** 1024), which would kill the shipping thread.
        exponent = min(max(0, failures - 1), self._last_step())
        ceiling = min(self.maximum, self.initial * self.multiplier**exponent)
        return ceiling * (1.0 - self.jitter * self.random())

    def _last_step(self) -> int:
        return math.ceil(math.log(self.maximum / self.initial, self.multiplier))


@dataclass(frozen=True, slots=True)
class ShipperStats:
    shipped: int
    rejected: int
    failures: int
    last_error: str


class Shipper:
    """Reads the spool after the acknowledged position and sends batches via ``transport``."""

    def __init__(
        self,
        spool: Spool,
        transport: Transport,
        *,
        batch: int = 2000,
        backoff: Backoff | None = None,
        idle: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        dead_letter: Path | None = None,
    ) -> None:
        self._spool = spool
        self._dead_letter = dead_letter
        self._transport = transport
        self._batch = batch
        self._backoff = backoff or Backoff()
        self._idle = idle
        self._clock = clock
        self._retry_at = 0.0
        self._consecutive = 0
        self._shipped = 0
        self._rejected = 0
        self._failures = 0
        self._last_error = ""

    def ship_once(self) -> int:
        """Send the next batch and acknowledge it in the spool; returns how many records it
        held (0: nothing to send). Raises TransportError, leaving the spool untouched."""
        payloads, end = self._spool.read(self._spool.acked, self._batch)
        if not payloads:
            return 0
        self._deliver(payloads)
        self._spool.ack(end)
        self._shipped += len(payloads)
        return len(payloads)

    def _deliver(self, payloads: list[bytes]) -> None:
        try:
            acked = self._transport.send(payloads)
        except RecordsRefused as exc:
            acked = self._dead_letter_named(payloads, exc)
        except TransportError as exc:
            if not exc.rejected:
                raise
            acked = self._deliver_one_by_one(payloads)
        # The control plane acknowledges every record of a call or fails the call.
        if acked != len(payloads):
            raise TransportError(f"{len(payloads) - acked} records not acknowledged")

    def _dead_letter_named(self, payloads: list[bytes], exc: RecordsRefused) -> int:
        """The control plane stored the batch except the records it names: dead-letter exactly
        those, with no re-send. An answer that does not account for every record once (a
        position out of range or repeated, a count that does not add up) moves nothing and
        is retried: the spool is only acknowledged on a whole answer."""
        positions = {r.index for r in exc.refused}
        whole = exc.acknowledged + len(exc.refused) == len(payloads)
        if (
            not whole
            or len(positions) != len(exc.refused)
            or not positions <= set(range(len(payloads)))
        ):
            raise TransportError(
                f"ingest answer accounts for {exc.acknowledged} acknowledged and "
                f"{len(exc.refused)} refused of {len(payloads)} records"
            )
        for refused in exc.refused:
            self._refuse(payloads[refused.index], f"{refused.reason}: {refused.detail}")
        return len(payloads)

    def _deliver_one_by_one(self, payloads: list[bytes]) -> int:
        """A control plane older than the refused list refused the batch without naming the
        records: find them by sending one at a time (the stored ones come back acknowledged as
        duplicates) and dead-letter those it refuses."""
        for payload in payloads:
            try:
                self._transport.send([payload])
            except TransportError as exc:
                if not exc.rejected:
                    raise
                self._refuse(payload, str(exc))
        return len(payloads)

    def _refuse(self, payload: bytes, error: str) -> None:
        """Move a refused record to the dead-letter file (logged by id, counted), so one bad
        record cannot stop the trail and none is lost unseen."""
        self._dead(payload)
        self._rejected += 1
        log.error(
            "audit record refused by the control plane; kept in the dead-letter file",
            extra={
                "event_id": _event_id(payload),
                "error": error,
                "dead_letter": str(self._dead_letter or ""),
            },
        )

    def _dead(self, payload: bytes) -> None:
        if self._dead_letter is None:
            return
        fd = os.open(self._dead_letter, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "ab") as fh:
            fh.write(frame(payload))
            fh.flush()
            os.fsync(fh.fileno())

    def poll(self) -> float:
        """Ship if a retry is not pending; returns seconds to wait before polling again."""
        now = self._clock()
        if now < self._retry_at:
            return self._retry_at - now
        try:
            sent = self.ship_once()
        except TransportError as exc:
            self._consecutive += 1
            self._failures += 1
            self._last_error = str(exc)
            delay = self._backoff.delay(self._consecutive)
            self._retry_at = now + delay
            if self._consecutive == 1:
                log.warning("audit shipping failed; spooling", extra={"error": str(exc)})
            return delay
        if self._consecutive:
            log.info("audit shipping resumed", extra={"after_failures": self._consecutive})
        self._consecutive = 0
        # A full batch leaves a backlog: send on at once. Otherwise wait ``idle``, so a loaded
        # sidecar sends one large call per interval, as documented, not a few records per call.
        return 0.0 if sent >= self._batch else self._idle

    def run(self, stop: threading.Event, wake: threading.Event) -> None:
        """Poll until ``stop``; ``wake`` cuts a wait short (shutdown)."""
        while not stop.is_set():
            delay = self.poll()
            if delay > 0:
                wake.wait(delay)
                wake.clear()

    def drain(self, deadline: float) -> bool:
        """Ship until the spool is empty, a send fails, or ``deadline`` (clock) passes; True
        when everything was delivered."""
        while self._clock() < deadline:
            try:
                if self.ship_once() == 0:
                    return True
            except TransportError:
                return False
        return False

    def stats(self) -> ShipperStats:
        return ShipperStats(self._shipped, self._rejected, self._failures, self._last_error)


def _event_id(payload: bytes) -> str:
    try:
        return decode(payload).id
    except ValueError:
        return "(unreadable)"
