"""OpenTelemetry spans for Envoy's Check and for admin calls, exported over OTLP/gRPC.

Off unless ``tracing_endpoint`` is set: then, and only then, the OpenTelemetry SDK is imported
and the Check handler is wrapped, so an untraced sidecar pays nothing per check. The parent
context is W3C trace context (``traceparent``/``tracestate``): from the ext_authz call's gRPC
metadata when Envoy itself traces (its ext_authz span is then our parent), else from the client
request's headers that Envoy forwards inside the CheckRequest.

Each process gets its own TracerProvider (never the global one), so the control plane and the
sidecar of ``spauth serve`` export under their own service names."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2 as ext

from sidecar.authz.decision import Decision
from sidecar.authz.engine import CheckInput
from sidecar.ops.metrics import OUTCOME_LABEL

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

CHECK_SPAN = "envoy.service.auth.v3.Authorization/Check"
TRACE_HEADERS = ("traceparent", "tracestate")
Context = grpc.ServicerContext
# The Check handler: a CheckRequest (or a stand-in for bytes that are not one) in, the
# serialized CheckResponse out.
CheckFn = Callable[[Any, Context], bytes]
Metadata = Mapping[str, str] | tuple[tuple[str, Any], ...] | None


class TracingUnavailable(RuntimeError):
    """Tracing is configured but the OpenTelemetry packages are not installed."""


class Tracing:
    """A tracer and the provider that exports its spans; ``shutdown()`` flushes them."""

    def __init__(self, tracer: Tracer, provider: Any) -> None:
        self.tracer = tracer
        self._provider = provider

    def shutdown(self) -> None:
        """Export what is buffered, then stop (called last on graceful shutdown)."""
        self._provider.shutdown()


def start_tracing(endpoint: str, service: str, sample_ratio: float = 1.0) -> Tracing | None:
    """A Tracing exporting to the OTLP/gRPC collector at ``endpoint``, or None when empty."""
    if not endpoint:
        return None
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError as exc:
        raise TracingUnavailable(
            f"tracing_endpoint is set but OpenTelemetry is missing ({exc.name}): "
            "pip install 'statuspulse-auth[tracing]'"
        ) from None
    provider = TracerProvider(
        resource=Resource.create({"service.name": service}),
        sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
    )
    exporter = OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=1000))
    return Tracing(provider.get_tracer("statuspulse-auth"), provider)


def _carrier(request: object, context: Context) -> dict[str, str]:
    carrier: dict[str, str] = {}
    if isinstance(request, ext.CheckRequest):
        headers = request.attributes.request.http.headers
        for name in TRACE_HEADERS:
            if name in headers:
                carrier[name] = headers[name]
    for name, value in context.invocation_metadata() or ():
        if name in TRACE_HEADERS and isinstance(value, str):
            carrier[name] = value  # Envoy's own ext_authz span wins over the client's
    return carrier


def traced_check(check: CheckFn, tracing: Tracing) -> CheckFn:
    """Wrap the Check handler in a SERVER span whose parent comes from W3C trace context. The
    decision's attributes are added by ``span_annotator`` (an observer), which runs inside it."""
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    propagator = TraceContextTextMapPropagator()
    tracer = tracing.tracer

    def handler(request: object, context: Context) -> bytes:
        parent = propagator.extract(_carrier(request, context))
        with tracer.start_as_current_span(CHECK_SPAN, context=parent, kind=SpanKind.SERVER):
            return check(request, context)

    return handler


def span_annotator() -> Callable[[Decision, CheckInput, str, float], None]:
    """A Check observer that puts the decision on the current span (when one is recording)."""
    from opentelemetry.trace import get_current_span

    def annotate(decision: Decision, _req: CheckInput, _src: str, _t: float) -> None:
        span = get_current_span()
        if span.is_recording():
            span.set_attribute("spauth.decision_id", decision.decision_id)
            span.set_attribute("spauth.reason", decision.reason.value)
            span.set_attribute("spauth.outcome", OUTCOME_LABEL[decision.outcome])

    return annotate


def metadata_carrier(metadata: Metadata) -> dict[str, str]:
    """The W3C trace headers among gRPC invocation metadata."""
    items = metadata.items() if isinstance(metadata, Mapping) else (metadata or ())
    return {k: v for k, v in items if k in TRACE_HEADERS and isinstance(v, str)}
