"""The sidecar's denial log writes its lines on a writer thread (sidecar.ops.line_writer): the
same lines and fields as written on the RPC thread, stamped with the time of the denial, in
order, before the summary; a full queue never blocks the caller and its lines are counted."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest

from sidecar.authz.decision import Decision, Identity, Reason
from sidecar.authz.engine import CheckInput
from sidecar.logs import JsonFormatter
from sidecar.ops.denial_log import DenialLog
from sidecar.ops.line_writer import LineWriter
from tests.support.ops import wait_until

REQUEST = CheckInput("DELETE", "/v1/workspaces/acme/checks/1?api_key=spk_x", "h", {}, {})
KEY = Identity("api_key", "key_known", "acme", frozenset(), 2e9)


def _denial(n: int, reason: Reason = Reason.INSUFFICIENT_SCOPE) -> Decision:
    ident = KEY if reason is Reason.INSUFFICIENT_SCOPE else None
    return Decision(reason, f"dec_w_{n}", ident, "checks:write" if ident else "")


def _lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    formatter = JsonFormatter()
    return [json.loads(formatter.format(r)) for r in caplog.records]


def test_background_lines_equal_the_lines_written_in_place(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.decisions")
    in_place, background = DenialLog(0), DenialLog(0, background=True)
    for denials in (in_place, background):
        denials(_denial(1), REQUEST, "10.0.0.7", 0.0)
        denials(_denial(2, Reason.UNKNOWN_CREDENTIAL), REQUEST, "10.0.0.7", 0.0)
    assert len(caplog.records) == 2  # the background ones are queued, not written
    background.close()
    first, second = _lines(caplog)[:2], _lines(caplog)[2:4]
    for line in first + second:
        line.pop("ts")
    assert first == second
    assert first[0]["key_id"] == "key_known" and first[0]["path"] == "/v1/workspaces/acme/checks/1"
    assert first[1]["reason"] == "unknown_credential" and "key_id" not in first[1]


def test_a_line_carries_the_time_of_the_denial_not_of_the_write(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.decisions")
    denials = DenialLog(0, background=True)
    before = time.time()
    denials(_denial(1), REQUEST, "peer", 0.0)
    queued = time.time()
    while time.time() <= queued:  # the write happens strictly later than the denial
        pass
    denials.close()
    (record,) = caplog.records
    assert before <= record.created <= queued
    assert record.msecs == int((record.created - int(record.created)) * 1000)


def test_the_writer_thread_writes_without_being_asked(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.decisions")
    denials = DenialLog(0, background=True)
    denials.start()
    try:
        denials(_denial(1), REQUEST, "peer", 0.0)
        wait_until(lambda: len(caplog.records) == 1, what="the line written")
    finally:
        denials.close()
    assert caplog.records[0].__dict__["decision_id"] == "dec_w_1"


def test_a_full_queue_drops_lines_counts_them_and_reports_them_after_the_queued_ones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.decisions")
    denials = DenialLog(0, background=True, capacity=2)
    for n in range(5):
        denials(_denial(n), REQUEST, "peer", 0.0)
    denials(_denial(9, Reason.UNKNOWN_CREDENTIAL), REQUEST, "peer", 0.0)
    assert caplog.records == []
    assert denials.flush(force=True) == 4
    written = [r.__dict__.get("decision_id") for r in caplog.records[:2]]
    assert written == ["dec_w_0", "dec_w_1"]  # in order, before the summary
    (summary,) = caplog.records[2:]
    assert summary.getMessage() == "denial log lines dropped (writer queue full)"
    assert summary.__dict__["dropped"] == 4
    assert summary.__dict__["by_reason"] == {"insufficient_scope": 3, "unknown_credential": 1}


def test_suppressed_and_dropped_lines_are_reported_apart(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.decisions")
    denials = DenialLog(rate=1, background=True, capacity=1)
    for n in range(3):  # a burst of 1: one queued, two suppressed
        denials(_denial(n), REQUEST, "peer", 0.0)
    for n in range(3):  # anonymous: its own bucket, but the queue is full
        denials(_denial(10 + n, Reason.UNKNOWN_CREDENTIAL), REQUEST, "peer", 0.0)
    assert denials.flush(force=True) == 5
    summaries = {r.getMessage(): r.__dict__ for r in caplog.records if r.levelname == "WARNING"}
    assert summaries["denial log lines suppressed (rate limit)"]["by_reason"] == {
        "insufficient_scope": 2,
        "unknown_credential": 2,
    }
    assert summaries["denial log lines dropped (writer queue full)"]["by_reason"] == {
        "unknown_credential": 1
    }


def test_queueing_never_waits_for_a_write_in_progress() -> None:
    release, emitting = threading.Event(), threading.Event()
    written: list[int] = []

    def slow_emit(item: int) -> None:
        emitting.set()
        release.wait()
        written.append(item)

    writer = LineWriter(slow_emit, capacity=10)
    writer.put(1)
    drainer = threading.Thread(target=writer.drain)
    drainer.start()
    assert emitting.wait(10)
    # The drainer holds its lock and is stuck in a write: the caller still queues at once.
    assert [writer.put(n) for n in (2, 3)] == [True, True]
    release.set()
    drainer.join()
    writer.close()
    assert written == [1, 2, 3]


def test_an_emit_that_fails_is_logged_and_the_rest_still_go_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    written: list[int] = []

    def emit(item: int) -> None:
        if item == 2:
            raise ValueError("bad line")
        written.append(item)

    writer = LineWriter(emit)
    for n in (1, 2, 3):
        writer.put(n)
    assert writer.drain() == 3
    assert written == [1, 3]
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        "log line not written"
    ]


@pytest.mark.parametrize(("capacity", "interval"), [(0, 1.0), (1, 0.0)])
def test_a_writer_needs_room_and_an_interval(capacity: int, interval: float) -> None:
    with pytest.raises(ValueError, match="positive capacity and interval"):
        LineWriter(lambda _: None, capacity=capacity, interval=interval)


def test_a_summary_never_waits_for_a_stuck_log_pipe_and_follows_the_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.decisions")
    entered, release = threading.Event(), threading.Event()
    written: list[str] = []

    class StuckPipe(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            entered.set()
            release.wait()
            written.append(record.getMessage())

    pipe = StuckPipe()
    logger = logging.getLogger("sidecar.decisions")
    logger.addHandler(pipe)
    denials = DenialLog(rate=1, background=True)
    denials.start()
    try:
        for n in range(3):  # one line, two suppressed
            denials(_denial(n), REQUEST, "peer", 0.0)
        assert entered.wait(10)  # the writer is stuck writing the line
        returned = threading.Event()
        summing = threading.Thread(target=lambda: returned.set() if denials.flush(True) else None)
        summing.start()
        assert returned.wait(10), "the summary waited for the stuck write"
        summing.join()
        release.set()
    finally:
        release.set()
        denials.close()
        logger.removeHandler(pipe)
    assert written == ["request denied", "denial log lines suppressed (rate limit)"]
