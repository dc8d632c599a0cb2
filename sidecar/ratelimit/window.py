"""A sliding window of event counts in ``buckets`` equal steps: O(buckets) memory per name, O(1)
per event. The window covers the current bucket and the ``buckets - 1`` before it, so it slides
in steps of ``span / buckets`` and never counts an event older than ``span``."""

from __future__ import annotations


class BucketWindow:
    """Counts per bucket in a ring; bucket ``k`` covers ``[k * width, (k + 1) * width)``."""

    __slots__ = ("_counts", "_head", "_total", "buckets", "span", "width")

    def __init__(self, span: float, buckets: int = 10) -> None:
        if span <= 0 or buckets < 1:
            raise ValueError("a window needs a positive span and at least one bucket")
        self.buckets = buckets
        self.span = span
        self.width = span / buckets
        self._counts = [0] * buckets
        self._head = 0  # the newest bucket index seen
        self._total = 0

    def index(self, now: float) -> int:
        """The bucket that holds time ``now``."""
        return int(now // self.width)

    def oldest(self, now: float) -> int:
        """The oldest bucket index still inside the window at ``now``."""
        return self.index(now) - self.buckets + 1

    def _advance(self, k: int) -> None:
        head = self._head
        if k <= head:
            return  # same bucket, or a clock that stepped back: count in the newest bucket
        counts = self._counts
        if k - head >= self.buckets:
            self._counts = [0] * self.buckets
            self._total = 0
        else:
            for j in range(head + 1, k + 1):
                slot = j % self.buckets
                self._total -= counts[slot]
                counts[slot] = 0
        self._head = k

    def add(self, now: float, n: int = 1) -> int:
        """Count ``n`` events at ``now``; returns the bucket index they went into."""
        k = self.index(now)
        self._advance(k)
        k = max(k, self._head)
        self._counts[k % self.buckets] += n
        self._total += n
        return k

    def total(self, now: float) -> int:
        """Events inside the window at ``now``."""
        self._advance(self.index(now))
        return self._total

    def set(self, k: int, count: int, now: float) -> None:
        """Overwrite bucket ``k`` (a shared view read back from elsewhere); ignored when ``k``
        is outside the window."""
        self._advance(self.index(now))
        if not self._head - self.buckets < k <= self._head:
            return
        slot = k % self.buckets
        self._total += count - self._counts[slot]
        self._counts[slot] = count

    def clear(self) -> None:
        self._counts = [0] * self.buckets
        self._total = 0

    def reopen_at(self, now: float, limit: int) -> float:
        """When the count falls below ``limit`` if nothing more is added (``now`` if it is
        below already): the time the bucket that tips it leaves the window."""
        total = self.total(now)
        if total < limit:
            return now
        for k in range(self._head - self.buckets + 1, self._head + 1):
            total -= self._counts[k % self.buckets]
            if total < limit:
                return (k + self.buckets) * self.width
        return (self._head + self.buckets) * self.width
