"""The audit writer's 10 ms tick (docs/performance.md, "The audit writer's tick"): its records
framed in one C call with the bytes of the Python framing, the spool's cheap "below the limit"
test equal to ``pending_bytes < limit`` wherever the spool is, the shedding of allows past
``max_spool_bytes`` unchanged, and the writer stopped promptly by ``close`` (it sleeps on a
lock, no longer on an Event)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from sidecar.auditship import AuditPipeline, ShipConfig, Spool, decision_event, spool
from sidecar.auditship.spool import frame, frames, parse_frames
from sidecar.core.audit import AuditEvent

_native: Any = pytest.importorskip("sidecar.auditship._frames")

SHAPES = [
    [],
    [b""],
    [b"x"],
    [bytes(range(256)) * 3, b"", b"\x00" * 17],
    [os.urandom(n) for n in (1, 7, 64, 330, 4096, 65_536)],
    [os.urandom(330) for _ in range(400)],  # past the size where the C call lets go of the GIL
    [os.urandom(1 << 20)],
]


@pytest.mark.parametrize("payloads", SHAPES, ids=lambda p: f"{len(p)} records")
def test_the_c_framing_gives_the_bytes_of_the_python_framing(payloads: list[bytes]) -> None:
    expected = b"".join(frame(p) for p in payloads)
    assert _native.frames(payloads) == expected
    assert frames(payloads) == expected
    assert parse_frames(expected) == (payloads, len(expected))


def test_the_python_framing_is_kept_where_the_c_one_is_not_built(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    payloads = [os.urandom(n) for n in range(0, 900, 37)]
    monkeypatch.setattr(spool, "_native", None)
    assert frames(payloads) == b"".join(frame(p) for p in payloads)
    store = Spool(tmp_path)
    store.append(payloads)
    assert store.read(store.acked, 1000)[0] == payloads
    store.close()


def test_the_c_framing_takes_bytes_only() -> None:
    with pytest.raises(TypeError, match="payload 1 is str"):
        _native.frames([b"a", "b"])
    with pytest.raises(TypeError):
        _native.frames(None)
    assert _native.frames((b"a", b"b")) == frame(b"a") + frame(b"b")  # any sequence


def test_below_is_pending_bytes_under_the_limit_through_appends_acks_and_rotations(
    tmp_path: Path,
) -> None:
    store = Spool(tmp_path, segment_bytes=3_000)
    limits = (0, 1, 337, 338, 1_000, 2_999, 3_000, 5_000, 10_000, 1 << 30)

    def same() -> None:
        pending = store.pending_bytes
        assert store._stored == sum(store._sizes.values())  # the bound kept, not only safe
        for limit in limits:
            assert store.below(limit) == (pending < limit), (limit, pending)

    same()
    for n in range(60):
        store.append([os.urandom(330)] * (1 + n % 3))
        same()
        if n % 7 == 6:  # ship part of it: an ack inside a segment, or past finished ones
            _, position = store.read(store.acked, 1 + n % 5)
            store.ack(position)
            same()
    _, position = store.read(store.acked, 10_000)
    store.ack(position)
    same()
    assert store.pending_bytes == 0 and store.below(1) and not store.below(0)
    store.append([b"y" * 100])
    store.close()
    reopened = Spool(tmp_path, segment_bytes=3_000)  # recovered from the files
    pending = reopened.pending_bytes
    assert pending == 108
    assert [reopened.below(limit) for limit in limits] == [pending < limit for limit in limits]
    reopened.close()


def _decision(i: int, allowed: bool) -> AuditEvent:
    return decision_event(
        time=1_700_000_000.0 + i,
        allowed=allowed,
        reason="ok" if allowed else "unknown_key",
        credential_id="key_a",
        workspace="acme",
        method="GET",
        path="/v1/checks",
        source="127.0.0.1:5000",
        decision_id=f"dec_{i:06d}",
        latency_s=0.0001,
    )


def test_past_max_spool_bytes_the_writer_keeps_denials_and_sheds_allows(tmp_path: Path) -> None:
    pipeline = AuditPipeline(ShipConfig(tmp_path, max_spool_bytes=2_000), None)
    i = 0
    while pipeline.spool.pending_bytes < 2_000:  # below the limit everything is written
        pipeline.record(_decision(i, allowed=True))
        i += 1
        assert pipeline.flush(sync=False) == 1
    assert pipeline.stats().spool_dropped_allows == 0
    written = pipeline.stats().written
    for j in range(i, i + 6):
        pipeline.record(_decision(j, allowed=j % 2 == 0))
    assert pipeline.flush(sync=False) == 3  # the three denials
    assert pipeline.stats().spool_dropped_allows == 3
    assert pipeline.stats().dropped == 3
    records, position = pipeline.spool.read(pipeline.spool.acked, 10_000)
    assert len(records) == written + 3
    pipeline.spool.ack(position)  # shipped: below the limit again
    pipeline.record(_decision(i + 6, allowed=True))
    assert pipeline.flush(sync=False) == 1
    pipeline.close(timeout=1.0)


def test_close_stops_the_writer_within_a_tick_and_writes_what_was_queued(
    tmp_path: Path,
) -> None:
    pipeline = AuditPipeline(ShipConfig(tmp_path, write_interval=3600.0), None)
    pipeline.start()
    writer = pipeline._threads[0]
    pipeline.record(_decision(1, allowed=False))
    pipeline.close(timeout=30.0)  # a writer still asleep would keep the hour's wait
    assert not writer.is_alive()
    pipeline.close(timeout=1.0)  # a second close is harmless
    reopened = Spool(tmp_path)
    assert len(reopened.read(reopened.acked, 10)[0]) == 1
    reopened.close()


def _python_parse(data: bytes, limit: int = 1 << 62) -> tuple[list[bytes], int]:
    saved = spool._native
    spool._native = None
    try:
        return parse_frames(data, limit)
    finally:
        spool._native = saved


def _mutations(data: bytes) -> list[bytes]:
    """``data`` cut short, with a flipped payload byte, a flipped CRC byte, a length past the
    end and past MAX_FRAME, and random bytes: where the reference stops, the C path must too."""
    import random

    rng = random.Random(19)
    out = [data[:n] for n in (0, 1, 7, 8, 9, len(data) // 2, len(data) - 1)]
    for at in (8, 5, 0, 3):
        if at < len(data):
            flipped = bytearray(data)
            flipped[at] ^= 0x40
            out.append(bytes(flipped))
    out.append(b"\xff\xff\xff\x7f" + data[4:])
    out.append((spool.MAX_FRAME + 1).to_bytes(4, "little") + data[4:])
    out += [rng.randbytes(rng.randrange(64)) for _ in range(200)]
    out += [frame(b"") * 3, frame(b"") + b"\x00" * 7]
    return out


@pytest.mark.parametrize("payloads", SHAPES, ids=lambda p: f"{len(p)} records")
def test_the_c_read_back_answers_as_the_python_one(payloads: list[bytes]) -> None:
    """The shipper's read-back (spool.parse_frames) in C: the same payloads and offset as the
    Python reference on whole, cut, corrupted and random input, with and without a limit."""
    data = b"".join(frame(p) for p in payloads)
    for sample in [data, *_mutations(data)]:
        for limit in (1 << 62, 0, 1, 3, 399):
            assert _native.parse_frames(sample, limit, spool.MAX_FRAME) == _python_parse(
                sample, limit
            )
    assert parse_frames(data) == (payloads, len(data))


@pytest.mark.parametrize("payloads", SHAPES, ids=lambda p: f"{len(p)} records")
def test_the_c_ingest_request_gives_the_bytes_of_the_python_one(payloads: list[bytes]) -> None:
    from sidecar.auditship import codec
    from sidecar.protowire import ld

    expected = b"".join(ld(1, p) for p in payloads)
    assert _native.ingest_request(payloads) == expected
    assert codec.ingest_request_sliced(payloads) == expected
    with pytest.raises(TypeError, match="payload 1 is str"):
        _native.ingest_request([b"a", "b"])
    with pytest.raises(TypeError):
        _native.parse_frames("not bytes", 1, 1)
