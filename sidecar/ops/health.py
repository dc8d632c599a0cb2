"""Health as a value: serving, degraded (answering, but something needs attention) or not
serving, with the reasons. gRPC health, ``/readyz`` and logs all render the same value."""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable
from dataclasses import dataclass


class Status(enum.StrEnum):
    SERVING = "serving"
    DEGRADED = "degraded"  # still ready: e.g. answering from a replica the control plane no
    # longer updates, until max_staleness
    NOT_SERVING = "not_serving"


_RANK = {Status.SERVING: 0, Status.DEGRADED: 1, Status.NOT_SERVING: 2}


@dataclass(frozen=True, slots=True)
class Health:
    """One component's state and why."""

    status: Status
    reasons: tuple[str, ...] = ()

    @property
    def ready(self) -> bool:
        """Whether traffic should be sent here (Kubernetes readiness, Envoy health checks)."""
        return self.status is not Status.NOT_SERVING

    def body(self) -> bytes:
        """The JSON body of ``/readyz``."""
        return json.dumps({"status": self.status.value, "reasons": list(self.reasons)}).encode()


SERVING = Health(Status.SERVING)


def worst(healths: Iterable[Health]) -> Health:
    """Combine components: the worst status, with every reason."""
    items = list(healths) or [SERVING]
    status = max((h.status for h in items), key=_RANK.__getitem__)
    return Health(status, tuple(r for h in items for r in h.reasons))
