"""The sidecar's audit pipeline: ``record()`` on the Check path, a writer thread moving the
queue to the spool every ``write_interval`` (fsync every ``fsync_interval``), and a shipper
thread sending the spool to the control plane.

Loss bound on ``kill -9`` (docs/audit.md): a record is safe from a process kill once the writer
has appended it, i.e. at most ``write_interval`` plus one write after ``record()`` returned.
What was still in the queue is lost: the records of the last ``write_interval`` (at most
``queue_capacity`` allows plus the queued denials). A power loss also loses what was appended
after the last fsync: at most ``fsync_interval``. Records are shipped at least once; the
control plane stores each id once.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sidecar.auditship.codec import encode
from sidecar.auditship.queue import AuditQueue, Item, QueueStats
from sidecar.auditship.records import PendingDecision
from sidecar.auditship.shipper import DEAD_LETTER_FILE, Backoff, Shipper, ShipperStats
from sidecar.auditship.spool import Spool, frames
from sidecar.auditship.transport import Transport
from sidecar.core.audit import AuditEvent, scrub

log = logging.getLogger("sidecar.auditship")


@dataclass(frozen=True, slots=True)
class ShipConfig:
    """Tunables of the pipeline (map from Settings in the sidecar's wiring)."""

    spool_dir: Path
    queue_capacity: int = 10_000
    deny_headroom: int = 4
    allow_sample_rate: float = 1.0
    write_interval: float = 0.01
    fsync_interval: float = 1.0
    segment_bytes: int = 8 << 20
    max_spool_bytes: int = 256 << 20
    batch_records: int = 2000
    ship_interval: float = 0.5
    backoff: Backoff = field(default_factory=Backoff)


@dataclass(frozen=True, slots=True)
class PipelineStats:
    queue: QueueStats
    written: int
    spool_dropped_allows: int
    write_errors: int
    spool_bytes: int
    shipper: ShipperStats | None

    @property
    def dropped(self) -> int:
        """Every record lost on purpose or by error (the spauth_audit_dropped_total value)."""
        q = self.queue
        return q.dropped_allows + q.dropped_denials + self.spool_dropped_allows + self.write_errors


class AuditPipeline:
    """Queue → spool → control plane. ``record`` is the one call the sidecar makes per
    decision; ``start`` and ``close`` bracket the sidecar's life."""

    def __init__(
        self,
        config: ShipConfig,
        transport: Transport | None,
        *,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.queue = AuditQueue(
            config.queue_capacity,
            deny_headroom=config.deny_headroom,
            allow_sample_rate=config.allow_sample_rate,
            rand=rand,
        )
        self.spool = Spool(
            config.spool_dir,
            segment_bytes=config.segment_bytes,
            max_bytes=config.max_spool_bytes,
        )
        self.shipper = (
            Shipper(
                self.spool,
                transport,
                batch=config.batch_records,
                backoff=config.backoff,
                idle=config.ship_interval,
                clock=clock,
                dead_letter=config.spool_dir / DEAD_LETTER_FILE,
            )
            if transport is not None
            else None
        )
        self._clock = clock
        self._transport = transport
        self._stop = threading.Event()
        # The writer sleeps on this lock, held until ``close``: one C call per tick where
        # ``Event.wait`` ran ≈ 15 lines of Python (threading.Condition) around its sleep, on
        # waking too, holding the GIL (docs/performance.md, "The audit writer's tick").
        self._halt = threading.Lock()
        self._halt.acquire()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._written = 0
        self._spool_dropped = 0
        self._write_errors = 0

    def record(self, ev: AuditEvent) -> bool:
        """Hand a decision record over without blocking; False when dropped or sampled out."""
        return self.queue.put(ev)

    def start(self) -> None:
        for name, target in (("audit-writer", self._write_loop), ("audit-shipper", self._ship)):
            if target == self._ship and self.shipper is None:
                continue
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _ship(self) -> None:
        assert self.shipper is not None
        self.shipper.run(self._stop, self._wake)

    def _write_loop(self) -> None:
        last_sync = self._clock()
        while not self._halt.acquire(timeout=self.config.write_interval):
            self.flush(sync=False)
            if self._clock() - last_sync >= self.config.fsync_interval:
                self.spool.sync()
                last_sync = self._clock()

    def flush(self, *, sync: bool = True) -> int:
        """Move everything queued into the spool now; returns how many records it wrote."""
        # Only this thread adds to the spool, so whether it is below its limit holds for the
        # whole flush. Below it nothing is shed: the C path's records come framed in one call
        # (the 10 ms tick's GIL, issue #19). Else, or with a Python record queued, the records
        # are drained one by one.
        room = self.spool.below(self.config.max_spool_bytes)
        framed = self.queue.drain_frames() if room else None
        items: list[tuple[Item, bool]] = []
        if framed is None:
            items = self.queue.drain_items()
            count = len(items)
        else:
            count = framed[1]
        if not count:
            if sync:
                self.spool.sync()
            return 0
        if not room:
            # The control plane has been away for long: keep denials, shed allows.
            kept: list[tuple[Item, bool]] = [(item, False) for item, kind in items if not kind]
            self._spool_dropped += len(items) - len(kept)
            items = kept
            count = len(kept)
        try:
            if framed is None:
                self.spool.append_framed(frames([_payload(item) for item, _ in items]))
            else:
                self.spool.append_framed(framed[0])
            if sync:
                self.spool.sync()
        except OSError:
            self._write_errors += count
            log.exception("audit spool write failed; records lost", extra={"count": count})
            return 0
        # The shipper is not woken here: it wakes every ship_interval and sends everything in
        # large batches (one call per 2000 records, not one per 10 ms write).
        self._written += count
        return count

    def close(self, timeout: float = 5.0) -> bool:
        """Stop the writer (flushing and fsyncing the queue), then ship what is spooled for up
        to ``timeout`` seconds; what is left stays in the spool for the next start. True when
        everything was delivered. ``timeout`` bounds the whole close: the threads' exits (the
        shipper's may be in a send) come out of the same seconds as the last shipping."""
        end = time.monotonic() + timeout
        self._stop.set()
        if self._halt.locked():
            self._halt.release()
        self._wake.set()
        for thread in self._threads:
            thread.join(max(0.0, end - time.monotonic()))
        self._threads.clear()
        self.flush(sync=True)
        left = max(0.0, end - time.monotonic())
        delivered = self.shipper.drain(self._clock() + left) if self.shipper else False
        self.spool.close()
        if self._transport is not None:
            self._transport.close()
        return delivered

    def stats(self) -> PipelineStats:
        return PipelineStats(
            queue=self.queue.stats(),
            written=self._written,
            spool_dropped_allows=self._spool_dropped,
            write_errors=self._write_errors,
            spool_bytes=self.spool.pending_bytes,
            shipper=self.shipper.stats() if self.shipper else None,
        )


def _payload(item: Item) -> bytes:
    """A record's spool payload: as the compiled Check path encoded it, a queued decision's
    hand-assembled record, or any other event scrubbed and encoded."""
    if isinstance(item, bytes):
        return item
    if isinstance(item, PendingDecision):
        return item.payload()
    return encode(scrub(item))
