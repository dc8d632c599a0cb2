"""A grpc.aio server interceptor for the admin API: ``spauth_admin_calls_total{method,code}`` and,
when tracing is on, one SERVER span per call.

Only methods the server implements are counted, so a client probing random method names cannot
grow the label set; health checks and reflection are left out (probes would drown the rest)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import Counter

from sidecar.ops.tracing import Tracing, metadata_carrier

SKIPPED_SERVICES = ("grpc.health.v1.", "grpc.reflection.")

if TYPE_CHECKING:
    Ctx = grpc.aio.ServicerContext[Any, Any]
    Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]]


def method_label(full_method: str) -> str:
    """``/statuspulse.auth.v1.ApiKeyService/CreateApiKey`` -> ``ApiKeyService/CreateApiKey``."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return f"{service.rpartition('.')[2]}/{method}"


def _code(context: Ctx, exc: BaseException | None) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED.name
    return grpc.StatusCode.UNKNOWN.name if exc is not None else grpc.StatusCode.OK.name


class AdminCallInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Counts (and traces) every implemented admin RPC by method and final status code."""

    def __init__(self, calls: Counter, tracing: Tracing | None = None) -> None:
        self._calls = calls
        self._tracing = tracing

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        full = handler_call_details.method
        if handler is None or full.lstrip("/").startswith(SKIPPED_SERVICES):
            return handler
        label = method_label(full)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, label, full),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, label, full),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _span(self, full: str, context: Ctx) -> AbstractContextManager[Any]:
        if self._tracing is None:
            return nullcontext()
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        parent = TraceContextTextMapPropagator().extract(
            metadata_carrier(context.invocation_metadata())
        )
        return self._tracing.tracer.start_as_current_span(
            full.lstrip("/"), context=parent, kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.method": full},
        )  # fmt: skip

    def _unary(self, behavior: Any, label: str, full: str) -> Any:
        async def wrapper(request: Any, context: Ctx) -> Any:
            error: BaseException | None = None
            with self._span(full, context) as span:
                try:
                    return await behavior(request, context)
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    self._finish(label, context, error, span)

        return wrapper

    def _stream(self, behavior: Any, label: str, full: str) -> Any:
        async def wrapper(request: Any, context: Ctx) -> AsyncIterator[Any]:
            error: BaseException | None = None
            with self._span(full, context) as span:
                try:
                    async for response in behavior(request, context):
                        yield response
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    self._finish(label, context, error, span)

        return wrapper

    def _finish(
        self,
        label: str,
        context: Ctx,
        error: BaseException | None,
        span: Any,
    ) -> None:
        code = _code(context, error)
        self._calls.labels(label, code).inc()
        if span is not None:
            span.set_attribute("rpc.grpc.status_code", getattr(grpc.StatusCode, code).value[0])
