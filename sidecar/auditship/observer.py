"""The one integration point with the sidecar: a Check observer that hands each decision to the
pipeline without waiting; the writer thread turns it into an ``authz.allow`` / ``authz.deny``
record (sidecar.auditship.records.PendingDecision)."""

from __future__ import annotations

from sidecar.auditship.pipeline import AuditPipeline
from sidecar.auditship.records import PendingDecision
from sidecar.authz.decision import Decision
from sidecar.authz.engine import CheckInput
from sidecar.core.clock import Clock

_new_tuple = tuple.__new__


class DecisionRecorder:
    """``observe(decision, view, source, elapsed)`` for ``CheckHandler.observers``."""

    def __init__(self, pipeline: AuditPipeline, clock: Clock) -> None:
        self.queue = pipeline.queue
        self.clock = clock

    def __call__(self, decision: Decision, view: CheckInput, source: str, elapsed: float) -> None:
        allowed = decision.allowed
        queue = self.queue
        if allowed and not queue.keep_allow():
            return  # sampled out before anything is queued
        # tuple.__new__: NamedTuple's own __new__ is Python code, and this runs on every check.
        pending = _new_tuple(
            PendingDecision,
            (decision, view.method, view.path, source, elapsed, self.clock.now()),
        )
        queue.put_pending(pending, allowed)
