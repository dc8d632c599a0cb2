"""Envoy ext_authz (``envoy.service.auth.v3.Authorization/Check``): CheckRequest in, Decision from
the engine, CheckResponse bytes out (see ``wire``).

A denial is a successful RPC carrying a non-OK status and the HTTP answer (Envoy's
``failure_mode_allow`` does not apply to it); only internal faults are gRPC errors. An empty
CheckResponse would be an allow (proto3 default code 0), so every response sets its status."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping

import grpc
from envoy.config.core.v3.base_pb2 import HeaderValue
from envoy.service.auth.v3 import external_auth_pb2 as ext
from google.protobuf.message import DecodeError

from sidecar.authz.decision import Decision
from sidecar.authz.engine import CheckInput, Engine
from sidecar.dataplane.check_responses import ResponseEncoder
from sidecar.ops.metrics import BAD_CHECK_REQUEST, INTERNAL_ERROR

log = logging.getLogger("sidecar.check")

SERVICE = "envoy.service.auth.v3.Authorization"

Observer = Callable[[Decision, CheckInput, str, float], None]
# Bounded cost per request: Envoy's own header limits are 60 KiB and 100 headers by default
# (max_request_headers_kb, max_headers_count); a CheckRequest beyond these caps is refused with
# INVALID_ARGUMENT before its headers are read, whatever sent it.
MAX_CHECK_REQUEST_BYTES = 256 * 1024
MAX_HEADERS = 256
_perf_counter = time.perf_counter
_new_tuple = tuple.__new__


def request_view(request: ext.CheckRequest) -> CheckInput:
    """The engine's view of a CheckRequest. Reads ``headers`` and, when Envoy sends raw headers
    (``encode_raw_headers``), ``header_map`` instead; duplicates are merged with commas. The
    source is the address of Envoy's downstream TCP peer (CheckRequestUtils::setAttrContextPeer
    reads the connection's remote address): the client, or a load balancer in front of Envoy."""
    attributes = request.attributes
    http = attributes.request.http
    headers: Mapping[str, str] = http.headers
    if not headers and http.header_map.headers:
        headers = _merged(http.header_map.headers)
    # tuple.__new__: NamedTuple's own __new__ is Python code, and this runs on every check.
    return _new_tuple(
        CheckInput,
        (
            http.method,
            http.path,
            http.host,
            headers,
            attributes.context_extensions,
            attributes.source.address.socket_address.address,
        ),
    )


def _merged(entries: Iterable[HeaderValue]) -> dict[str, str]:
    """Raw headers (``encode_raw_headers``) merged like Envoy's map: duplicates joined with
    commas, in one pass (values collected, then joined once: repeated string concatenation
    was quadratic, 9 s of CPU for one 3.2 MB request)."""
    values: dict[str, list[str]] = {}
    for h in entries:
        value = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
        values.setdefault(h.key.lower(), []).append(value)
    return {name: ",".join(parts) for name, parts in values.items()}


class Malformed:
    """Stands for bytes that are not a CheckRequest, or one over the caps (grpc treats a None
    request as its own deserialization failure and answers INTERNAL; we answer
    INVALID_ARGUMENT). ``message`` says which."""

    def __init__(self, message: str) -> None:
        self.message = message


MALFORMED = Malformed("malformed CheckRequest")
TOO_LARGE = Malformed(f"CheckRequest over {MAX_CHECK_REQUEST_BYTES} bytes")
TOO_MANY_HEADERS = Malformed(f"CheckRequest with more than {MAX_HEADERS} headers")


def parse_check_request(data: bytes) -> ext.CheckRequest | Malformed:
    """Deserialize, or a Malformed: bytes that are not a CheckRequest, or one over the caps
    (size first: it costs nothing, and a huge request is never parsed)."""
    if len(data) > MAX_CHECK_REQUEST_BYTES:
        return TOO_LARGE
    try:
        request = ext.CheckRequest.FromString(data)
    except DecodeError:
        return MALFORMED
    http = request.attributes.request.http
    if len(http.headers) > MAX_HEADERS or len(http.header_map.headers) > MAX_HEADERS:
        return TOO_MANY_HEADERS
    return request


class CheckHandler:
    """The Check RPC: decide, answer, then tell observers (metrics, audit, logs). ``on_error``
    counts the checks that end in a gRPC error instead of a decision (a malformed request, an
    internal fault)."""

    def __init__(
        self,
        engine: Engine,
        observers: list[Observer] | None = None,
        on_error: Callable[[str, float], None] | None = None,
        *,
        failure_window: float = 60.0,
    ) -> None:
        self.engine = engine
        self.observers = observers if observers is not None else []
        self.on_error = on_error
        self.encoder = ResponseEncoder(failure_window)

    def __call__(
        self, request: ext.CheckRequest | Malformed, context: grpc.ServicerContext
    ) -> bytes:
        started = _perf_counter()
        if request.__class__ is Malformed:
            assert isinstance(request, Malformed)
            if self.on_error is not None:
                self.on_error(BAD_CHECK_REQUEST, 0.0)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        try:
            view = request_view(request)
            engine = self.engine
            decision = engine.check(view)
            policy = engine.policy
            response = self.encoder.encode(
                decision, policy.credential_headers if policy.strip_credentials else ()
            )
        except Exception:
            log.exception("check failed")
            if self.on_error is not None:
                self.on_error(INTERNAL_ERROR, 0.0)
            context.abort(grpc.StatusCode.INTERNAL, "internal error")
        elapsed = _perf_counter() - started
        try:
            for observe in self.observers:
                observe(decision, view, view.source, elapsed)
        except Exception:  # an observer's bug must not pass unseen; Envoy gets an error (deny)
            if self.on_error is not None:
                self.on_error(INTERNAL_ERROR, 0.0)
            raise
        return response


def check_method(
    handler: Callable[[ext.CheckRequest | Malformed, grpc.ServicerContext], bytes],
) -> grpc.RpcMethodHandler:  # type: ignore[type-arg]
    """Check as a gRPC method: our own deserializer, so garbage bytes get INVALID_ARGUMENT, and
    no serializer, because the handler returns serialized bytes."""
    return grpc.unary_unary_rpc_method_handler(
        handler, request_deserializer=parse_check_request, response_serializer=None
    )


def raw_check_method(
    handler: Callable[[bytes, grpc.ServicerContext], bytes],
) -> grpc.RpcMethodHandler:  # type: ignore[type-arg]
    """Check as a gRPC method whose handler takes the request's bytes (the compiled path,
    sidecar.dataplane.fastcheck, which parses them itself or calls ``parse_check_request``)."""
    return grpc.unary_unary_rpc_method_handler(
        handler, request_deserializer=None, response_serializer=None
    )
