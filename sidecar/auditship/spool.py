"""The append-only spool: audit records on local disk between the queue and the control plane.

Layout: a directory of segment files ``000000000001.spool``, ``000000000002.spool``, ... and a
file ``shipped`` holding the position (segment, offset) up to which the control plane has
acknowledged. A segment is a sequence of frames ``<u32 length><u32 crc32><payload>`` (little
endian). Writes go straight to the file with ``os.write`` (the kernel's page cache), so a record
survives the process being killed once its ``append`` has returned; ``sync`` (fsync) makes it
survive a power loss too and is batched by the caller.

On open, a torn last frame (the process died inside a write) is cut off: its length or
checksum does not match. A lost or stale ``shipped`` file only means records are sent again;
the control plane de-duplicates them by id.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import threading
import zlib
from pathlib import Path

from sidecar.auditship import gil
from sidecar.core.native import optional_module

FRAME = struct.Struct("<II")
SUFFIX = ".spool"
ACK_FILE = "shipped"
MAX_FRAME = 1 << 20

log = logging.getLogger("sidecar.auditship")

# The framing in C (sidecar/auditship/_frames.c), where it was built.
_native, _ = optional_module("sidecar.auditship._frames")

Position = tuple[int, int]  # (segment number, byte offset)


def frame(payload: bytes) -> bytes:
    """One record as stored: length, CRC32, payload."""
    return FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def frames(payloads: list[bytes]) -> bytes:
    """Every record as stored, in order: ``b"".join(frame(p) for p in payloads)``. The writer
    frames each tick's records with it: one C call where built (it lets go of the GIL while it
    copies a backlog of 64 KiB or more), else ``frame`` per record, letting go of the GIL every
    ``gil.SLICE_RECORDS`` records (docs/performance.md, "The audit writer's tick")."""
    if _native is not None:
        framed: bytes = _native.frames(payloads)
        return framed
    return b"".join(b"".join(frame(p) for p in piece) for piece in gil.slices(payloads))


def parse_frames(data: bytes, limit: int = 1 << 62) -> tuple[list[bytes], int]:
    """Up to ``limit`` whole frames at the start of ``data`` and the offset after the last one;
    stops at a partial or corrupt frame. In C where built (the shipper's read-back, ≈ 2 µs a
    record in Python: docs/performance.md, "The shipper's read-back in C"; it checks 64 KiB or
    more without the GIL), else here, letting go of the GIL every ``gil.SLICE_RECORDS`` frames
    (the shipper parses hundreds at a time)."""
    if _native is not None and type(data) is bytes:
        parsed: tuple[list[bytes], int] = _native.parse_frames(data, limit, MAX_FRAME)
        return parsed
    out: list[bytes] = []
    offset = 0
    every = gil.SLICE_RECORDS or limit
    while offset + FRAME.size <= len(data) and len(out) < limit:
        if out and len(out) % every == 0:
            gil.let_go()
        length, crc = FRAME.unpack_from(data, offset)
        end = offset + FRAME.size + length
        if length > MAX_FRAME or end > len(data):
            break
        payload = data[offset + FRAME.size : end]
        if zlib.crc32(payload) != crc:
            break
        out.append(payload)
        offset = end
    return out, offset


class Spool:
    """Segmented append-only record files with a persisted shipping position. One writer thread
    calls ``append``/``sync``; one shipper thread calls ``read``/``ack``."""

    def __init__(
        self, directory: Path, *, segment_bytes: int = 8 << 20, max_bytes: int = 256 << 20
    ) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._sizes: dict[int, int] = {}
        self._stored = 0  # sum(self._sizes.values()), kept with it under the lock
        self._acked: Position = (0, 0)
        self._fd = -1
        self._dirty = False
        self._recover()

    # -- recovery ---------------------------------------------------------------------------

    def _path(self, segment: int) -> Path:
        return self.directory / f"{segment:012d}{SUFFIX}"

    def _recover(self) -> None:
        segments = sorted(
            int(p.stem) for p in self.directory.glob(f"*{SUFFIX}") if p.stem.isdigit()
        )
        self._acked = self._read_ack(segments)
        for segment in segments:
            if segment < self._acked[0]:
                self._path(segment).unlink(missing_ok=True)  # shipped; its delete was lost
                continue
            self._sizes[segment] = self._path(segment).stat().st_size
        if not self._sizes:
            self._sizes[max(self._acked[0], 1)] = 0
        last = max(self._sizes)
        data = self._path(last).read_bytes() if self._path(last).exists() else b""
        _, good = parse_frames(data)
        if good < len(data):
            log.warning(
                "audit spool: cut a torn record at the end of the spool",
                extra={"segment": last, "bytes": len(data) - good},
            )
        self._fd = os.open(self._path(last), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.ftruncate(self._fd, good)
        self._sizes[last] = good
        self._stored = sum(self._sizes.values())
        self._acked = self._clamp(self._acked)

    def _clamp(self, acked: Position) -> Position:
        """An acknowledged position inside the data we have (after a power loss the ``shipped``
        file can be newer than the segment's surviving bytes)."""
        segment, offset = acked
        if segment in self._sizes:
            return segment, min(offset, self._sizes[segment])
        later = [s for s in self._sizes if s > segment]
        return (min(later), 0) if later else (max(self._sizes), self._sizes[max(self._sizes)])

    def _read_ack(self, segments: list[int]) -> Position:
        try:
            seg, off = (self.directory / ACK_FILE).read_text().split()
            return int(seg), int(off)
        except (FileNotFoundError, ValueError):
            return (segments[0], 0) if segments else (1, 0)

    # -- writer side ------------------------------------------------------------------------

    def append(self, payloads: list[bytes]) -> None:
        """Append records in order; returns once they are in the kernel (not yet fsynced)."""
        if payloads:
            self.append_framed(frames(payloads))

    def append_framed(self, data: bytes) -> None:
        """Append records already framed (``frames``); returns once they are in the kernel."""
        if not data:
            return
        last = max(self._sizes)
        if self._sizes[last] and self._sizes[last] + len(data) > self.segment_bytes:
            last = self._rotate(last)
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        with self._lock:
            self._sizes[last] += len(data)
            self._stored += len(data)
        self._dirty = True

    def _rotate(self, last: int) -> int:
        os.fsync(self._fd)  # a finished segment is complete on disk before the next begins
        os.close(self._fd)
        nxt = last + 1
        self._fd = os.open(self._path(nxt), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with self._lock:
            self._sizes[nxt] = 0
        _fsync_dir(self.directory)
        return nxt

    def sync(self) -> None:
        """fsync what was appended since the last sync (call on the writer's interval)."""
        if self._dirty:
            os.fsync(self._fd)
            self._dirty = False

    # -- shipper side -----------------------------------------------------------------------

    @property
    def acked(self) -> Position:
        return self._acked

    def read(self, start: Position, max_records: int) -> tuple[list[bytes], Position]:
        """Up to ``max_records`` payloads from ``start`` and the position after them."""
        out: list[bytes] = []
        segment, offset = start
        while len(out) < max_records:
            with self._lock:
                size = self._sizes.get(segment)
                later = [s for s in self._sizes if s > segment]
            if size is None:
                if not later:
                    break
                segment, offset = min(later), 0
                continue
            if offset >= size:
                if not later:
                    break
                segment, offset = min(later), 0
                continue
            payloads, used = self._read_segment(segment, offset, size, max_records - len(out))
            out.extend(payloads)
            if used == 0:  # corrupt frame inside a finished segment: skip the rest of it
                log.error("audit spool: corrupt record skipped", extra={"segment": segment})
                offset = size
                continue
            offset += used
        return out, (segment, offset)

    def _read_segment(
        self, segment: int, offset: int, size: int, limit: int
    ) -> tuple[list[bytes], int]:
        # Enough for ``limit`` typical records, and always for one of the largest allowed, so
        # a chunk that yields no frame means a corrupt one.
        chunk = min(size - offset, max(limit * 2048, MAX_FRAME + FRAME.size))
        with open(self._path(segment), "rb") as fh:
            fh.seek(offset)
            data = fh.read(chunk)
        return parse_frames(data, limit)

    def ack(self, position: Position) -> None:
        """Everything before ``position`` is stored by the control plane: persist the position
        (atomically, by rename) and delete segments that are wholly shipped."""
        tmp = self.directory / (ACK_FILE + ".tmp")
        tmp.write_text(f"{position[0]} {position[1]}\n")
        os.replace(tmp, self.directory / ACK_FILE)
        self._acked = position
        with self._lock:
            done = [s for s in self._sizes if s < position[0]]
            for s in done:
                self._stored -= self._sizes.pop(s)
        for s in done:
            self._path(s).unlink(missing_ok=True)

    def below(self, limit: int) -> bool:
        """``pending_bytes < limit``, for the writer's every tick without the sum when the spool
        is far from ``limit``. ``_stored`` is read first: only the writer (the caller) adds
        bytes, and ``ack`` moves ``_acked`` before it deletes a shipped segment, so this bound
        is never below ``pending_bytes`` at the moment ``_acked`` is read."""
        if self._stored - self._acked[1] < limit:
            return True
        return self.pending_bytes < limit

    @property
    def pending_bytes(self) -> int:
        """Bytes written but not yet acknowledged by the control plane."""
        with self._lock:
            total = sum(size for s, size in self._sizes.items() if s >= self._acked[0])
        return max(0, total - self._acked[1])

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
