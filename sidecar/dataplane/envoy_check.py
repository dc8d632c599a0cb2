"""Envoy ext_authz (``envoy.service.auth.v3.Authorization/Check``): CheckRequest in, Decision from
the engine, CheckResponse bytes out (see ``wire``).

A denial is a successful RPC carrying a non-OK status and the HTTP answer (Envoy's
``failure_mode_allow`` does not apply to it); only internal faults are gRPC errors. An empty
CheckResponse would be an allow (proto3 default code 0), so every response sets its status."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

import grpc
from envoy.service.auth.v3 import external_auth_pb2 as ext
from google.protobuf.message import DecodeError

from sidecar.authz.decision import Decision
from sidecar.authz.engine import CheckInput, Engine
from sidecar.dataplane.check_responses import ResponseEncoder
from sidecar.ops.metrics import BAD_CHECK_REQUEST, INTERNAL_ERROR

log = logging.getLogger("sidecar.check")

SERVICE = "envoy.service.auth.v3.Authorization"

Observer = Callable[[Decision, CheckInput, str, float], None]
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
        merged: dict[str, str] = {}
        for h in http.header_map.headers:
            value = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
            name = h.key.lower()
            merged[name] = f"{merged[name]},{value}" if name in merged else value
        headers = merged
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


class Malformed:
    """Stands for bytes that are not a CheckRequest (grpc treats a None request as its own
    deserialization failure and answers INTERNAL; we answer INVALID_ARGUMENT)."""


MALFORMED = Malformed()


def parse_check_request(data: bytes) -> ext.CheckRequest | Malformed:
    """Deserialize, or MALFORMED for bytes that are not a CheckRequest."""
    try:
        return ext.CheckRequest.FromString(data)
    except DecodeError:
        return MALFORMED


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
            if self.on_error is not None:
                self.on_error(BAD_CHECK_REQUEST, 0.0)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed CheckRequest")
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
