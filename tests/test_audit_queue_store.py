"""The audit queue's two stores on the same operations: ``DequeStore`` (pure Python, the
reference) and the compiled path's C ``AuditBuffer`` must accept and drop the same records,
drain them in the same order and count the same (capacity, deny headroom, the oldest allow
pushed out by a denial)."""

from __future__ import annotations

import importlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.auditship.queue import AuditQueue, DequeStore, QueueStore
from sidecar.auditship.spool import frames
from sidecar.dataplane.fastcheck import unavailable

pytestmark = pytest.mark.skipif(bool(unavailable()), reason=f"not built: {unavailable()}")

# (True, n): put an allow, (False, n): put a denial, None: drain
OPS = st.lists(st.one_of(st.none(), st.tuples(st.booleans(), st.integers(0, 1000))), max_size=300)


def _buffer(capacity: int, deny_limit: int) -> QueueStore:
    native = importlib.import_module("sidecar.dataplane._fastcheck")
    store: QueueStore = native.AuditBuffer(capacity, deny_limit)
    return store


@settings(max_examples=300, deadline=None)
@given(ops=OPS, capacity=st.integers(1, 8), headroom=st.integers(1, 3))
def test_the_c_store_keeps_the_python_stores_rules(
    ops: list[tuple[bool, int] | None], capacity: int, headroom: int
) -> None:
    python = DequeStore(capacity, capacity * headroom)
    c = _buffer(capacity, capacity * headroom)
    for op in ops:
        if op is None:
            assert c.drain() == python.drain()
        else:
            allowed, n = op
            item = f"record {n}".encode()
            assert c.put(item, allowed) == python.put(item, allowed)
        assert c.counts() == python.counts()
    assert c.drain() == python.drain()


def test_a_denial_pushes_out_the_oldest_allow_and_order_is_kept() -> None:
    store = _buffer(3, 6)
    for item, allowed in ((b"a1", True), (b"d1", False), (b"a2", True)):
        assert store.put(item, allowed)
    assert not store.put(b"a3", True)  # full: the newest allow is refused
    assert store.put(b"d2", False)  # full: a1 makes room
    assert store.counts() == (3, 3, 2, 0)  # a1 no longer counts as accepted
    assert store.drain() == [(b"d1", False), (b"a2", True), (b"d2", False)]
    assert store.counts() == (0, 3, 2, 0)


def test_the_store_changes_only_before_the_first_record() -> None:
    queue = AuditQueue(4)
    queue.use_store(_buffer(4, 16))
    assert queue.put_pending(b"x", True)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="before the first record"):
        queue.use_store(DequeStore(4, 16))
    assert queue.stats().accepted == 1


# (True, n) / (False, n): put an allow / a denial of n bytes; "drain": drain(); "framed":
# drain_frames(), which must give the frames of what drain() would have given
FRAMED_OPS = st.lists(
    st.one_of(
        st.sampled_from(["drain", "framed"]),
        st.tuples(st.booleans(), st.integers(0, 3000)),
    ),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(ops=FRAMED_OPS, capacity=st.integers(1, 40), headroom=st.integers(1, 3))
def test_drain_frames_frames_what_drain_gives_and_counts_the_same(
    ops: list[tuple[bool, int] | str], capacity: int, headroom: int
) -> None:
    """The audit writer's one-call drain (issue #19): the spool's frames of every queued
    record in order, the same queue counters after it; None, draining nothing, from 64 KiB."""
    python = DequeStore(capacity, capacity * headroom)
    c: Any = _buffer(capacity, capacity * headroom)
    for i, op in enumerate(ops):
        if op == "drain":
            assert c.drain() == python.drain()
        elif op == "framed":
            framed = c.drain_frames()
            if framed is None:  # too large for one call under the GIL: drain() then
                assert sum(8 + len(item) for item, _ in c.drain()) >= 64 * 1024
                python.drain()
            else:
                records = [item for item, _ in python.drain()]
                assert framed == (frames(records), len(records))  # type: ignore[arg-type]
                assert c.drain() == []
        else:
            allowed, n = op
            item = bytes([i % 251]) * n
            assert c.put(item, allowed) == python.put(item, allowed)
        assert c.counts() == python.counts()


def test_drain_frames_leaves_records_the_writer_encodes_to_drain() -> None:
    pytest.importorskip("sidecar.auditship._frames")
    store: Any = _buffer(8, 16)
    event = object()  # an AuditEvent or a PendingDecision: only the writer can encode it
    for item, allowed in ((b"a1", True), (event, False), (b"d1", False)):
        assert store.put(item, allowed)
    assert store.drain_frames() is None
    assert store.counts() == (3, 3, 0, 0)
    assert store.drain() == [(b"a1", True), (event, False), (b"d1", False)]
    assert store.drain_frames() == (b"", 0)
