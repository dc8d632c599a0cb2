"""The one integration point with the sidecar: a Check observer that turns each decision into an
``authz.allow`` / ``authz.deny`` record and hands it to the pipeline without waiting."""

from __future__ import annotations

from sidecar.auditship.pipeline import AuditPipeline
from sidecar.auditship.records import decision_event
from sidecar.core.clock import Clock
from sidecar.core.decision import Decision
from sidecar.core.engine import CheckInput


class DecisionRecorder:
    """``observe(decision, view, source, elapsed)`` for ``CheckHandler.observers``."""

    def __init__(self, pipeline: AuditPipeline, clock: Clock) -> None:
        self._queue = pipeline.queue
        self._clock = clock

    def __call__(self, decision: Decision, view: CheckInput, source: str, elapsed: float) -> None:
        allowed = decision.allowed
        if allowed and not self._queue.keep_allow():
            return  # sampled out before anything is built
        identity = decision.identity
        extra: dict[str, str] = {}
        actor = credential = workspace = ""
        if identity is not None:
            workspace = identity.workspace
            credential = identity.id
            # An access token speaks for its subject; the token's jti and client go alongside.
            actor = identity.subject or identity.client_id or identity.id
            if identity.kind != "api_key":
                extra = {"credential": identity.id, "client_id": identity.client_id}
        self._queue.put(
            decision_event(
                time=self._clock.now(),
                allowed=allowed,
                reason=decision.reason.value,
                credential_id=actor or credential,
                workspace=workspace,
                method=view.method,
                path=view.path,
                source=source,
                decision_id=decision.decision_id,
                latency_s=elapsed,
                extra=extra,
            ),
            sampled=True,
        )
