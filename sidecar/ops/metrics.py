"""Every ``spauth_*`` Prometheus metric, on one registry per process.

Names are fixed (dashboards and alerts depend on them) and label values are bounded: reason codes,
three outcomes, two results, four OAuth events, admin method names and gRPC codes. Never a key id,
workspace or path. A metric is created the first time a component asks for it, so the control
plane and the sidecar can share one registry in ``spauth serve``.

The Check hot path writes only its own thread's tally (sidecar.ops.check_tally): a few list
increments, no lock (measured in docs/operating.md)."""

from __future__ import annotations

from collections.abc import Iterable
from functools import cached_property

from prometheus_client import CollectorRegistry, Counter, Gauge

from sidecar.authz.decision import OUTCOMES, Decision, Outcome, Reason
from sidecar.authz.engine import CheckInput
from sidecar.core.audit_batch import RefusalReason
from sidecar.ops.check_tally import CheckTally

# The `outcome` label: what Envoy did with the request. Unavailable answers (replica not ready
# or stale) are 503s, like internal faults: users see an outage, so they count as errors.
ALLOW, DENY, ERROR = "allow", "deny", "error"
OUTCOME_LABEL: dict[Outcome, str] = dict.fromkeys(Outcome, DENY)
OUTCOME_LABEL[Outcome.ALLOW] = ALLOW
OUTCOME_LABEL[Outcome.UNAVAILABLE] = ERROR
# `reason` values for checks that ended in a gRPC error rather than a decision.
INTERNAL_ERROR = "internal_error"
BAD_CHECK_REQUEST = "malformed_check_request"
ERROR_REASONS = (INTERNAL_ERROR, BAD_CHECK_REQUEST)
OAUTH_EVENTS = ("issued", "refreshed", "revoked", "reuse_detected")
# Check latency in-process is tens of microseconds; Envoy's ext_authz timeout is 0.25-0.5 s.
CHECK_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
)  # fmt: skip


class Metrics:
    """The metric objects of one process; each is created on first use (create them from one
    thread at start-up: ``sidecar_metrics()``, ``control_plane_metrics()``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()

    # -- sidecar ----------------------------------------------------------------------------------

    @cached_property
    def check_tally(self) -> CheckTally:
        """``spauth_decisions_total{outcome,reason}`` and ``spauth_check_duration_seconds``,
        counted per RPC thread (sidecar.ops.check_tally); every series exported from the start,
        so rate() has a baseline from the first scrape."""
        labels = [(OUTCOME_LABEL[OUTCOMES[r]], r.value) for r in Reason]
        labels += [(ERROR, r) for r in ERROR_REASONS]
        tally = CheckTally(labels, CHECK_BUCKETS)
        self.registry.register(tally)
        return tally

    @cached_property
    def replica_revision(self) -> Gauge:
        return Gauge(
            "spauth_replica_revision",
            "Change-log revision the credential replica is at.",
            registry=self.registry,
        )

    @cached_property
    def replica_staleness(self) -> Gauge:
        return Gauge(
            "spauth_replica_staleness_seconds",
            "Seconds since the replica last heard from the control plane.",
            registry=self.registry,
        )

    @cached_property
    def sync_reconnects(self) -> Counter:
        return Counter(
            "spauth_sync_reconnects",
            "Times the replication stream to the control plane was lost and reopened.",
            registry=self.registry,
        )

    @cached_property
    def replica_unknown_changes(self) -> Counter:
        return Counter(
            "spauth_replica_unknown_changes",
            "Replicated changes of a kind this sidecar does not know (not applied), by kind.",
            ["kind"],
            registry=self.registry,
        )

    @cached_property
    def policy_reloads(self) -> Counter:
        c = Counter(
            "spauth_policy_reloads",
            "Route policy file reloads, by result (ok|error; error keeps the previous policy).",
            ["result"],
            registry=self.registry,
        )
        for result in ("ok", "error"):
            c.labels(result)
        return c

    # -- audit: sidecar.auditship.metrics.AuditMetrics reads the pipeline at scrape time -------

    # -- control plane ----------------------------------------------------------------------------

    @cached_property
    def oauth_tokens(self) -> Counter:
        c = Counter(
            "spauth_oauth_tokens",
            "OAuth token events (issued|refreshed|revoked|reuse_detected).",
            ["event"],
            registry=self.registry,
        )
        for event in OAUTH_EVENTS:
            c.labels(event)
        return c

    @cached_property
    def admin_calls(self) -> Counter:
        return Counter(
            "spauth_admin_calls",
            "Admin API calls, by method (Service/Method) and gRPC status code.",
            ["method", "code"],
            registry=self.registry,
        )

    @cached_property
    def audit_ingest_conflicts(self) -> Counter:
        return Counter(
            "spauth_audit_ingest_conflicts",
            "Ingested decision records refused: their id is stored with other content.",
            registry=self.registry,
        )

    @cached_property
    def audit_ingested(self) -> Counter:
        return Counter(
            "spauth_audit_ingested_records",
            "Decision records stored by ingest (re-sends of stored records not counted).",
            registry=self.registry,
        )

    @cached_property
    def audit_ingest_refused(self) -> Counter:
        return Counter(
            "spauth_audit_ingest_refused_records",
            "Shipped decision records ingest refused, by reason (the sender dead-letters them).",
            ["reason"],
            registry=self.registry,
        )

    @cached_property
    def audit_stream_dead_lettered(self) -> Counter:
        c = Counter(
            "spauth_audit_stream_dead_lettered_records",
            "Audit-stream entries refused by ingest and kept in the dead-letter stream, by reason.",
            ["reason"],
            registry=self.registry,
        )
        for reason in RefusalReason:
            c.labels(reason.value)
        return c

    def count_ingest(self, stored: int, refused: Iterable[str]) -> None:
        """One committed ingest: ``stored`` new records, and the reasons of those refused."""
        self.audit_ingested.inc(stored)
        for reason in refused:
            self.audit_ingest_refused.labels(reason).inc()

    @cached_property
    def operator_key_expiry(self) -> Gauge:
        return Gauge(
            "spauth_operator_key_expiry_timestamp_seconds",
            "When the last usable operator key expires (Unix time; 0: no usable operator key).",
            registry=self.registry,
        )

    def sidecar_metrics(self) -> None:
        """Create the sidecar's metrics now, so they are exported before the first check."""
        for name in _SIDECAR:
            getattr(self, name)

    def control_plane_metrics(self) -> None:
        """Create the control plane's metrics now."""
        for name in _CONTROL_PLANE:
            getattr(self, name)


_SIDECAR = (
    "check_tally", "replica_revision", "replica_staleness", "sync_reconnects",
    "replica_unknown_changes", "policy_reloads",
)  # fmt: skip
_CONTROL_PLANE = (
    "oauth_tokens", "admin_calls", "operator_key_expiry", "audit_ingest_conflicts",
    "audit_ingested", "audit_ingest_refused", "audit_stream_dead_lettered",
)  # fmt: skip


class DecisionMetrics:
    """The Check observer: ``(decision, request, source, seconds)``. Slots are resolved once,
    so a check costs a few list increments on its own thread's tally."""

    def __init__(self, metrics: Metrics) -> None:
        tally = metrics.check_tally
        self.tally = tally
        self._slot = {r: tally.index(OUTCOME_LABEL[OUTCOMES[r]], r.value) for r in Reason}
        self._errors = {r: tally.index(ERROR, r) for r in ERROR_REASONS}
        self._count = tally.count

    def __call__(self, decision: Decision, _req: CheckInput, _src: str, elapsed: float) -> None:
        # in-cluster Authorize passes elapsed 0: only Envoy's Check is timed
        self._count(self._slot[decision.reason], elapsed)

    def slot(self, reason: Reason) -> int:
        """The tally slot a decision with ``reason`` counts in (the compiled Check path counts
        its allows in C, in the same layout: ``CheckTally.add_source``)."""
        return self._slot[reason]

    def error(self, reason: str, elapsed: float) -> None:
        """A check that ended in a gRPC error (Envoy answers 503)."""
        self._count(self._errors[reason], elapsed)
