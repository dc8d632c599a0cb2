"""A sidecar as shipped (compiled Check path, audit and usage on) observes the allows its C path
decides in C, and what it counted there still reaches everyone who reads it: the decision record
the control plane stores, /metrics, the usage report. Record, metric and usage equality with the
Python path is tests/test_fastcheck_differential.py."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from sidecar.core.audit import AuditEvent
from sidecar.dataplane.fastcheck import unavailable
from sidecar.dataplane.process import Sidecar
from tests.conftest import RunningControlPlane, wait_until
from tests.support.ops import bearer, call_check, check_request, create_key

pytestmark = pytest.mark.skipif(bool(unavailable()), reason=f"not built: {unavailable()}")
CHECKS = "/v1/workspaces/acme/checks"


def stored(sc: RunningControlPlane, event_id: str) -> AuditEvent | None:
    with sc.plane.store.read() as uow:
        return uow.audit.get(event_id)


def test_an_allow_observed_in_c_reaches_the_control_plane_and_the_metrics(
    control_plane: RunningControlPlane, sidecar_factory: Callable[..., Sidecar]
) -> None:
    sc = sidecar_factory()
    assert sc.fast_check is not None and sc.fast_check.observed_in_c
    secret, key_id = create_key(control_plane.address, control_plane.operator_key, ["checks:read"])
    wait_until(lambda: len(sc.replica.by_digest) >= 2)
    decided_before, _ = sc.fast_check.counts()
    ids = []
    for n in range(3):
        resp = call_check(sc.port, check_request(f"{CHECKS}/{n}?page=2", bearer(secret)))
        assert resp.status.code == 0
        ids.append(resp.dynamic_metadata.fields["decision_id"].string_value)
    assert sc.fast_check.counts()[0] == decided_before + 3  # decided, and observed, in C
    assert sc.audit is not None
    sc.audit.flush(sync=True)
    wait_until(lambda: all(stored(control_plane, i) is not None for i in ids), 30)
    for n, decision_id in enumerate(ids):
        record = stored(control_plane, decision_id)
        assert record is not None
        assert (record.actor, record.workspace, record.action, record.outcome, record.reason) == (
            key_id,
            "acme",
            "authz.allow",
            "allow",
            "ok",
        )
        assert record.target == f"{CHECKS}/{n}" and record.request_id == decision_id
        assert record.metadata["method"] == "GET" and int(record.metadata["latency_us"]) >= 0
    registry = sc.metrics.registry
    allows = registry.get_sample_value(
        "spauth_decisions_total", {"outcome": "allow", "reason": "ok"}
    )
    assert allows is not None and allows >= 3
    assert (registry.get_sample_value("spauth_check_duration_seconds_count") or 0) >= 3
    assert registry.get_sample_value("spauth_audit_dropped_total", {"outcome": "allow"}) == 0
