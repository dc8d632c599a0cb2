"""Envoy ext_authz (``envoy.service.auth.v3.Authorization/Check``): CheckRequest in, Decision from
the engine, CheckResponse out.

A denial is a successful RPC carrying a non-OK status and the HTTP answer (Envoy's
``failure_mode_allow`` does not apply to it); only internal faults are gRPC errors. An empty
CheckResponse would be an allow (proto3 default code 0), so every response sets its status."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping

import grpc
from envoy.config.core.v3.base_pb2 import HeaderValueOption
from envoy.service.auth.v3 import external_auth_pb2 as ext
from google.protobuf.message import DecodeError

from sidecar.core.decision import Decision, Identity, Outcome, Reason
from sidecar.core.engine import CheckInput, Engine
from sidecar.core.scopes import sort_scopes

log = logging.getLogger("sidecar.check")

SERVICE = "envoy.service.auth.v3.Authorization"
OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
IDENTITY_HEADERS = (
    "x-statuspulse-workspace",
    "x-statuspulse-key-id",
    "x-statuspulse-subject",
    "x-statuspulse-client-id",
    "x-statuspulse-scopes",
)
# google.rpc.Code values.
_GRPC_CODE = {
    Outcome.ALLOW: 0,
    Outcome.UNAUTHENTICATED: 16,
    Outcome.FORBIDDEN: 7,
    Outcome.BAD_REQUEST: 3,
    Outcome.TOO_MANY: 8,
    Outcome.UNAVAILABLE: 14,
}
_ERROR = {
    Outcome.UNAUTHENTICATED: "invalid_token",
    Outcome.FORBIDDEN: "insufficient_scope",
    Outcome.BAD_REQUEST: "invalid_request",
    Outcome.TOO_MANY: "rate_limited",
    Outcome.UNAVAILABLE: "temporarily_unavailable",
}
REALM = 'Bearer realm="statuspulse"'

Observer = Callable[[Decision, CheckInput, str, float], None]


def www_authenticate(decision: Decision) -> str | None:
    """RFC 6750 §3: no error code when the request had no credential at all."""
    reason = decision.reason
    if reason is Reason.MISSING_CREDENTIAL:
        return REALM
    if decision.outcome is Outcome.UNAUTHENTICATED:
        return f'{REALM}, error="invalid_token", error_description="{reason.value}"'
    if reason is Reason.INSUFFICIENT_SCOPE:
        return f'{REALM}, error="insufficient_scope", scope="{decision.detail}"'
    if reason is Reason.WORKSPACE_MISMATCH:
        return f'{REALM}, error="insufficient_scope"'
    return None


def request_view(request: ext.CheckRequest) -> CheckInput:
    """The engine's view of a CheckRequest. Reads ``headers`` and, when Envoy sends raw headers
    (``encode_raw_headers``), ``header_map`` instead; duplicates are merged with commas."""
    http = request.attributes.request.http
    headers: Mapping[str, str] = http.headers
    if not headers and http.header_map.headers:
        merged: dict[str, str] = {}
        for h in http.header_map.headers:
            value = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
            name = h.key.lower()
            merged[name] = f"{merged[name]},{value}" if name in merged else value
        headers = merged
    return CheckInput(
        method=http.method,
        path=http.path,
        host=http.host,
        headers=headers,
        context=request.attributes.context_extensions,
    )


class CheckResponses:
    """Builds CheckResponses for decisions."""

    def __init__(self, strip: Callable[[], tuple[str, ...]]) -> None:
        self._strip = strip
        self._scopes_header: dict[frozenset[str], str] = {}

    def build(self, decision: Decision) -> ext.CheckResponse:
        resp = ext.CheckResponse()
        outcome = decision.outcome
        resp.dynamic_metadata.fields["decision_id"].string_value = decision.decision_id
        resp.dynamic_metadata.fields["reason"].string_value = decision.reason.value
        if outcome is Outcome.ALLOW:
            self._allow(resp, decision)
        else:
            self._deny(resp, decision, outcome)
        return resp

    def _allow(self, resp: ext.CheckResponse, decision: Decision) -> None:
        resp.status.code = 0
        ok = resp.ok_response
        add = ok.headers.add
        add(header={"key": "x-statuspulse-decision-id", "value": decision.decision_id},
            append_action=OVERWRITE)  # fmt: skip
        remove = list(self._strip())
        ident = decision.identity
        if ident is None:
            remove.extend(IDENTITY_HEADERS)
        else:
            for name, value in self._identity_headers(ident):
                if value:
                    add(header={"key": name, "value": value}, append_action=OVERWRITE)
                else:
                    remove.append(name)
        ok.headers_to_remove.extend(remove)

    def _identity_headers(self, ident: Identity) -> tuple[tuple[str, str], ...]:
        scopes = self._scopes_header.get(ident.scopes)
        if scopes is None:
            scopes = " ".join(sort_scopes(ident.scopes))
            if len(self._scopes_header) < 4096:
                self._scopes_header[ident.scopes] = scopes
        return (
            ("x-statuspulse-workspace", ident.workspace),
            ("x-statuspulse-key-id", ident.id if ident.kind == "api_key" else ""),
            ("x-statuspulse-subject", ident.subject),
            ("x-statuspulse-client-id", ident.client_id),
            ("x-statuspulse-scopes", scopes),
        )

    @staticmethod
    def _deny(resp: ext.CheckResponse, decision: Decision, outcome: Outcome) -> None:
        resp.status.code = _GRPC_CODE[outcome]
        resp.status.message = decision.reason.value
        denied = resp.denied_response
        denied.status.code = decision.http_status
        add = denied.headers.add
        add(header={"key": "content-type", "value": "application/json"}, append_action=OVERWRITE)
        add(header={"key": "cache-control", "value": "no-store"}, append_action=OVERWRITE)
        add(header={"key": "x-statuspulse-decision-id", "value": decision.decision_id},
            append_action=OVERWRITE)  # fmt: skip
        challenge = www_authenticate(decision)
        if challenge is not None:
            add(header={"key": "www-authenticate", "value": challenge}, append_action=OVERWRITE)
        error = _ERROR[outcome] if decision.reason is not Reason.NO_ROUTE else "forbidden"
        denied.body = json.dumps(
            {"error": error, "reason": decision.reason.value, "decision_id": decision.decision_id}
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
    """The Check RPC: decide, answer, then tell observers (metrics, audit, logs)."""

    def __init__(self, engine: Engine, observers: list[Observer] | None = None) -> None:
        self.engine = engine
        self.observers = observers if observers is not None else []
        self.responses = CheckResponses(self._strip_headers)

    def _strip_headers(self) -> tuple[str, ...]:
        policy = self.engine.policy
        return policy.credential_headers if policy.strip_credentials else ()

    def __call__(
        self, request: ext.CheckRequest | Malformed, context: grpc.ServicerContext
    ) -> ext.CheckResponse:
        started = time.perf_counter()
        if isinstance(request, Malformed):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed CheckRequest")
        try:
            view = request_view(request)
            decision = self.engine.check(view)
            response = self.responses.build(decision)
        except Exception:
            log.exception("check failed")
            context.abort(grpc.StatusCode.INTERNAL, "internal error")
        elapsed = time.perf_counter() - started
        if self.observers:
            source = request.attributes.source.address.socket_address.address
            for observe in self.observers:
                observe(decision, view, source, elapsed)
        return response

    def rpc_handler(self) -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
        """A generic handler with our own deserializer, so garbage bytes get INVALID_ARGUMENT."""
        method = grpc.unary_unary_rpc_method_handler(
            self,
            request_deserializer=parse_check_request,
            response_serializer=ext.CheckResponse.SerializeToString,
        )
        return grpc.method_handlers_generic_handler(SERVICE, {"Check": method})
