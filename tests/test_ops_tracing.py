"""OpenTelemetry: spans for Check and admin calls reach a real OTLP/gRPC receiver, children of
the W3C trace context the caller sent; with tracing off the SDK is never even imported."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2 as pb
from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2_grpc
from sidecar.config import load_settings
from sidecar.controlplane import ControlPlane
from tests.conftest import LoopThread, RunningControlPlane
from tests.support.ops import (
    bearer,
    call_check,
    check_request,
    create_key,
    running_sidecar,
    sidecar_settings,
    wait_until,
)

trace_service = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")
trace_grpc = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc")

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


class Receiver(trace_grpc.TraceServiceServicer):  # type: ignore[misc,name-defined]
    """An OTLP/gRPC trace receiver that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[object] = []
        self._lock = threading.Lock()

    def Export(self, request: object, context: grpc.ServicerContext) -> object:
        with self._lock:
            for resource in request.resource_spans:  # type: ignore[attr-defined]
                service = next(
                    a.value.string_value
                    for a in resource.resource.attributes
                    if a.key == "service.name"
                )
                for scope in resource.scope_spans:
                    self.spans.extend((service, span) for span in scope.spans)
        return trace_service.ExportTraceServiceResponse()

    def named(self, name: str) -> list[tuple[str, object]]:
        with self._lock:
            return [(svc, s) for svc, s in self.spans if s.name == name]  # type: ignore[attr-defined]


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = Receiver()
    trace_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"http://127.0.0.1:{port}"
    server.stop(0)


def _attrs(span: object) -> dict[str, object]:
    out: dict[str, object] = {}
    for a in span.attributes:  # type: ignore[attr-defined]
        value = a.value
        out[a.key] = value.string_value or value.int_value
    return out


def test_check_span_continues_the_callers_trace(
    control_plane: RunningControlPlane, tmp_path: Path, receiver: tuple[Receiver, str]
) -> None:
    spans, endpoint = receiver
    secret, _ = create_key(control_plane.address, control_plane.operator_key, ["checks:read"])
    settings = sidecar_settings(control_plane.address, tmp_path / "sc", tracing_endpoint=endpoint)
    with running_sidecar(settings, control_plane.clock) as sidecar:
        wait_until(sidecar.ready)
        # The client's traceparent, as Envoy forwards it among the request headers.
        headers = {**bearer(secret), "traceparent": TRACEPARENT}
        response = call_check(sidecar.port, check_request("/v1/workspaces/acme/checks/1", headers))
        # Envoy's own ext_authz span (gRPC metadata) wins over the request header.
        envoy_parent = "1111111111111111"
        call_check(
            sidecar.port,
            check_request("/v1/workspaces/acme/checks/1"),
            metadata=(("traceparent", f"00-{TRACE_ID}-{envoy_parent}-01"),),
        )
    # stop() flushed the exporter.
    checks = spans.named("envoy.service.auth.v3.Authorization/Check")
    assert len(checks) == 2
    (service, allowed), (_, denied) = sorted(checks, key=lambda s: s[1].start_time_unix_nano)  # type: ignore[attr-defined]
    assert service == "spauth-sidecar"
    assert allowed.trace_id.hex() == TRACE_ID and allowed.parent_span_id.hex() == PARENT_ID  # type: ignore[attr-defined]
    attrs = _attrs(allowed)
    assert (
        attrs["spauth.decision_id"] == response.dynamic_metadata.fields["decision_id"].string_value
    )
    assert attrs["spauth.reason"] == "ok"
    assert _attrs(denied)["spauth.reason"] == "missing_credential"
    assert denied.parent_span_id.hex() == envoy_parent  # type: ignore[attr-defined]


def test_admin_calls_are_traced(
    tmp_path: Path, loop_thread: LoopThread, receiver: tuple[Receiver, str]
) -> None:
    spans, endpoint = receiver
    (tmp_path / "cp").mkdir()
    settings = load_settings(
        {"data_dir": str(tmp_path / "cp"), "admin_addr": "127.0.0.1:0",
         "http_addr": "127.0.0.1:0", "tracing_endpoint": endpoint},
        environ={},
    )  # fmt: skip
    plane = ControlPlane(settings)
    minted = plane.bootstrap()
    assert minted is not None
    loop_thread.run(plane.start())
    try:
        with grpc.insecure_channel(f"127.0.0.1:{plane.admin_port}") as channel:
            api_keys_pb2_grpc.ApiKeyServiceStub(channel).ListApiKeys(
                pb.ListApiKeysRequest(),
                metadata=(*bearer_md(minted.secret), ("traceparent", TRACEPARENT)),
                timeout=5,
            )
    finally:
        loop_thread.run(plane.aclose(grace=0))
    ((service, span),) = spans.named("statuspulse.auth.v1.ApiKeyService/ListApiKeys")
    assert service == "spauth-control-plane"
    assert span.trace_id.hex() == TRACE_ID and span.parent_span_id.hex() == PARENT_ID  # type: ignore[attr-defined]
    assert _attrs(span)["rpc.grpc.status_code"] == 0


def bearer_md(secret: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret}"),)


def test_tracing_off_imports_no_opentelemetry(tmp_path: Path) -> None:
    code = f"""
import sys
from sidecar.config import load_sidecar_settings, load_settings
from sidecar.dataplane.process import Sidecar
from sidecar.controlplane import ControlPlane
Sidecar(load_sidecar_settings({{"state_dir": {str(tmp_path)!r}}}, environ={{}}))
ControlPlane(load_settings({{"data_dir": {str(tmp_path)!r}}}, environ={{}}))
loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
assert not loaded, loaded
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
