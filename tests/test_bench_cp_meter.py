"""The bench's control-plane meter (bench.cp_cost) against a real control plane: the counters it
scrapes from /metrics are the ones ingest moves, refusals by reason, and the database count it
cross-checks with agrees. Fast (no h2load), so it runs where the smoke test is skipped."""

from __future__ import annotations

import os

from bench import cp_cost
from sidecar.auditship import decision_event
from sidecar.core.audit import AuditEvent, event
from sidecar.core.audit_trail import SIDECAR
from sidecar.core.models import RequestContext
from tests.conftest import RunningControlPlane


def decision(i: int, time: float) -> AuditEvent:
    return decision_event(
        time=time,
        allowed=True,
        reason="ok",
        credential_id="key_a",
        workspace="acme",
        method="GET",
        path="/v1/workspaces/acme/checks",
        source="203.0.113.7",
        decision_id=f"dec_{i:06d}",
        latency_s=0.0001,
    )


def test_the_meter_reads_ingest_counters_and_the_database_agrees(
    control_plane: RunningControlPlane,
) -> None:
    plane = control_plane.plane
    http = f"127.0.0.1:{plane.http_port}"
    meter = cp_cost.meter(0, http, control_plane.data_dir / "spauth.db")
    assert meter.cross_check is not None
    before, db_before = meter.read(), meter.cross_check()

    now = control_plane.clock.now()
    forged = event(now, "key_a", "key.revoked", "acme", "key_b")
    ctx = RequestContext(principal=SIDECAR, request_id="bench-meter", source="test")
    records = [decision(i, now) for i in range(3)]
    result = plane.audit.ingest(ctx, [*records, forged])
    assert result.stored == 3

    after = meter.read()
    assert after.stored - before.stored == 3
    moved = {r: n - before.refused.get(r, 0) for r, n in after.refused.items()}
    assert {r: n for r, n in moved.items() if n} == {"not_a_decision": 1}
    assert cp_cost.arrived(after) - cp_cost.arrived(before) == 4
    assert meter.cross_check() - db_before == 3
    # Waiting for records that have all arrived returns at once, reached.
    _, reached, _ = cp_cost.settle(meter, cp_cost.progress(meter))
    assert reached


def test_a_window_charges_ingest_with_what_the_background_does_not_explain(
    control_plane: RunningControlPlane,
) -> None:
    plane = control_plane.plane
    # This process runs the control plane: its CPU is the control plane's.
    meter = cp_cost.meter(
        os.getpid(), f"127.0.0.1:{plane.http_port}", control_plane.data_dir / "spauth.db"
    )
    cp_cost._background.pop((os.getpid(),), None)
    background = cp_cost.background_util(meter, seconds=0.2)
    assert background >= 0
    assert cp_cost.background_util(meter) == background  # read once per control plane

    window = cp_cost.IngestWindow(meter)
    now = control_plane.clock.now()
    ctx = RequestContext(principal=SIDECAR, request_id="bench-meter", source="test")
    for start in range(0, 600, 200):
        records = [decision(i, now) for i in range(start, start + 200)]
        assert plane.audit.ingest(ctx, records).stored == 200
    out = window.close(600)
    assert out["cp_records"] == 600 and out["cp_settled"] is True
    assert out["cp_background_cpu_util"] == round(background, 4)
    assert 0 <= out["cp_ingest_cpu_us_per_record"] <= out["cp_cpu_us_per_record"]
    summary = cp_cost.summary([out])
    assert summary["cp_ingest_cpu_us_per_record"] == out["cp_ingest_cpu_us_per_record"]
    assert summary["cp_background_cpu_util"] == out["cp_background_cpu_util"]
