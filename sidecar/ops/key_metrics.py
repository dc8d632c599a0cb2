"""``spauth_keys_expiring{workspace}``: usable keys inside the expiry warning window, per
workspace. Workspaces are tenants' names, so the label is bounded: the ``top`` workspaces with
the most expiring keys get their own series, the rest are summed under ``workspace="other"``
(and the operator key's workspace ``*`` is ``operator``)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sidecar.core.models import OPERATOR_WORKSPACE

NAME = "spauth_keys_expiring"
OTHER = "other"
OPERATOR = "operator"


class KeyExpiryMetrics(Collector):
    """Holds the counts of the last sweep (``update``) and exports them at scrape time."""

    def __init__(self, window_seconds: int, top: int = 20) -> None:
        self._window = window_seconds
        self._top = top
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def update(self, counts: Mapping[str, int]) -> None:
        with self._lock:
            self._counts = dict(counts)

    def series(self) -> dict[str, int]:
        """The exported label values and counts."""
        with self._lock:
            counts = dict(self._counts)
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        out = {OTHER: 0}
        for i, (workspace, n) in enumerate(ranked):
            if workspace == OPERATOR_WORKSPACE:
                out[OPERATOR] = n
            elif i < self._top:
                out[workspace] = n
            else:
                out[OTHER] += n
        return out

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            NAME,
            f"Usable API keys expiring within {self._window // 86400} days, by workspace "
            f"(top {self._top}, the rest as 'other'; the operator key as 'operator').",
            labels=("workspace",),
        )
        for workspace, n in sorted(self.series().items()):
            gauge.add_metric((workspace,), n)
        yield gauge
        yield GaugeMetricFamily(
            "spauth_keys_expiry_warning_seconds",
            "The expiry warning window: keys expiring within it count as expiring.",
            value=self._window,
        )
