"""The audit queue's two stores on the same operations: ``DequeStore`` (pure Python, the
reference) and the compiled path's C ``AuditBuffer`` must accept and drop the same records,
drain them in the same order and count the same (capacity, deny headroom, the oldest allow
pushed out by a denial)."""

from __future__ import annotations

import importlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.auditship.queue import AuditQueue, DequeStore, QueueStore
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
