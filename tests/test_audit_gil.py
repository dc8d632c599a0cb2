"""The audit shipper's long loops hand the GIL over between slices (sidecar.auditship.gil), with
the same bytes as in one go: spool frames parsed, an ingest request framed, records appended."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sidecar._gen.statuspulse.auth.v1 import audit_pb2 as pb
from sidecar.auditship import Spool, codec, gil, spool
from sidecar.auditship.codec import ingest_request, ingest_request_sliced
from sidecar.auditship.spool import frame, frames, parse_frames


def _payloads(n: int) -> list[bytes]:
    return [
        pb.AuditRecord(id=f"dec_{i:08d}", reason="ok" * (i % 7)).SerializeToString()
        for i in range(n)
    ]


@pytest.fixture
def slice_records() -> Iterator[Callable[[int], None]]:
    shipped = gil.SLICE_RECORDS

    def set_to(n: int) -> None:
        gil.SLICE_RECORDS = n

    yield set_to
    gil.SLICE_RECORDS = shipped


@pytest.mark.parametrize("size", [0, 1, 7, 64, 1000])
def test_slices_give_the_same_bytes_as_one_go(
    slice_records: Callable[[int], None], size: int, tmp_path: Path
) -> None:
    records = _payloads(300)
    slice_records(size)
    assert ingest_request_sliced(records) == ingest_request(records)
    assert list(
        pb.IngestAuditRecordsRequest.FromString(ingest_request_sliced(records)).records
    ) == [pb.AuditRecord.FromString(r) for r in records]
    data = b"".join(frame(r) for r in records) + frame(b"x")[:5]  # and a torn frame at the end
    assert parse_frames(data) == (records, len(data) - 5)
    assert parse_frames(data, limit=100) == (
        records[:100],
        len(b"".join(map(frame, records[:100]))),
    )
    spool = Spool(tmp_path / f"spool-{size}")
    spool.append(records)
    got, _ = spool.read(spool.acked, 1000)
    assert got == records
    spool.close()


def _waiter_ran_during(work: Callable[[], object]) -> bool:
    """Whether a thread that wants the GIL while ``work`` runs gets it before ``work`` returns,
    with forced switches off (a switch interval of a minute): only a hand-over lets it in."""
    held = threading.Lock()
    held.acquire()
    ready = threading.Event()
    ran_at: list[int] = []

    def waiter() -> None:
        ready.set()  # keeps the GIL until it blocks on ``held`` below
        held.acquire()  # released without the GIL; returning to Python needs it
        ran_at.append(time.perf_counter_ns())

    interval = sys.getswitchinterval()
    sys.setswitchinterval(60.0)
    try:
        thread = threading.Thread(target=waiter)
        thread.start()
        ready.wait()  # returns once the waiter blocked, letting go of the GIL
        held.release()  # the waiter now wants the GIL back: no GIL release here
        work()
        ended = time.perf_counter_ns()
        thread.join()
    finally:
        sys.setswitchinterval(interval)
    return ran_at[0] < ended


def test_a_thread_waiting_for_the_gil_runs_while_a_batch_is_parsed_and_framed(
    slice_records: Callable[[int], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Python path (where the C module is not built)."""
    monkeypatch.setattr(spool, "_native", None)
    monkeypatch.setattr(codec, "_native", None)
    records = _payloads(20_000)
    data = b"".join(frame(r) for r in records)
    slice_records(0)  # one go: the waiter only gets in once the loops are done
    assert not _waiter_ran_during(lambda: parse_frames(data))
    assert not _waiter_ran_during(lambda: ingest_request_sliced(records))
    slice_records(64)
    assert _waiter_ran_during(lambda: parse_frames(data))
    assert _waiter_ran_during(lambda: ingest_request_sliced(records))


def test_a_thread_waiting_for_the_gil_runs_while_the_writer_frames_a_backlog_in_c() -> None:
    """The C framing (sidecar/auditship/_frames.c) checksums and copies a backlog of 64 KiB
    or more without the GIL; a tick's few records (≈ 3 µs) keep it."""
    pytest.importorskip("sidecar.auditship._frames")
    records = _payloads(20_000) * 5
    assert _waiter_ran_during(lambda: frames(records))
    assert not _waiter_ran_during(lambda: frames(records[:10]))


def test_a_thread_waiting_for_the_gil_runs_while_the_shipper_reads_back_a_batch_in_c() -> None:
    """The C read-back (parse_frames) checks 64 KiB or more of frames, and the C ingest request
    copies as much, without the GIL; a few records keep it."""
    pytest.importorskip("sidecar.auditship._frames")
    # 32 MiB: milliseconds without the GIL, time for the waiter to be scheduled on a busy box.
    large = [bytes(range(256)) * 256] * 512
    data = b"".join(frame(r) for r in large)
    assert _waiter_ran_during(lambda: parse_frames(data))
    assert _waiter_ran_during(lambda: ingest_request_sliced(large))
    records = _payloads(10)
    few = b"".join(frame(r) for r in records)
    assert not _waiter_ran_during(lambda: parse_frames(few))
    assert not _waiter_ran_during(lambda: ingest_request_sliced(records))
