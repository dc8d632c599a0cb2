"""CheckResponse bytes, assembled from cached pieces.

Building a CheckResponse as protobuf objects costs ~10 µs per call in Python (every header is a
message, every field a C call); the framework itself costs ~150 µs per call, so that is most of
our budget. Protobuf's wire format is concatenative — repeated fields may arrive in several runs
and a message field is a tag, a length and bytes — so the parts that depend only on the identity
or the reason are serialized once by protobuf itself and cached, and each call adds only its
decision id. tests/test_wire.py parses every shape back with the real CheckResponse class."""

from __future__ import annotations

import json

from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.auth.v3 import external_auth_pb2 as ext
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.protobuf.struct_pb2 import Struct
from google.rpc.status_pb2 import Status

from sidecar.core.decision import Decision, Identity, Outcome, Reason
from sidecar.core.scopes import sort_scopes

OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
DECISION_HEADER = "x-statuspulse-decision-id"
IDENTITY_HEADERS = (
    "x-statuspulse-workspace",
    "x-statuspulse-key-id",
    "x-statuspulse-subject",
    "x-statuspulse-client-id",
    "x-statuspulse-scopes",
)
REALM = 'Bearer realm="statuspulse"'
# google.rpc.Code values.
GRPC_CODE = {
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
_CACHE_LIMIT = 100_000


def _field(name: str, message: type) -> int:
    return int(message.DESCRIPTOR.fields_by_name[name].number)  # type: ignore[attr-defined]


_SMALL = [bytes([i]) for i in range(128)]


def _varint(n: int) -> bytes:
    if n < 128:
        return _SMALL[n]
    if n < 16384:
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_TAGS = {field: _varint(field << 3 | 2) for field in range(1, 16)}


def _ld(field: int, payload: bytes) -> bytes:
    """A length-delimited field: tag, length, payload (fields 1-15 have one-byte tags)."""
    n = len(payload)
    return _TAGS[field] + (_SMALL[n] if n < 128 else _varint(n)) + payload


_RESP_STATUS = _field("status", ext.CheckResponse)
_RESP_DENIED = _field("denied_response", ext.CheckResponse)
_RESP_OK = _field("ok_response", ext.CheckResponse)
_RESP_META = _field("dynamic_metadata", ext.CheckResponse)
_OK_HEADERS = _field("headers", ext.OkHttpResponse)
_DENIED_HEADERS = _field("headers", ext.DeniedHttpResponse)
_DENIED_BODY = _field("body", ext.DeniedHttpResponse)
_OPT_HEADER = _field("header", HeaderValueOption)
_HV_KEY = _field("key", HeaderValue)
_HV_VALUE = _field("value", HeaderValue)
_STRUCT_FIELDS = _field("fields", Struct)
_STATUS_OK = _ld(_RESP_STATUS, Status(code=0).SerializeToString())
# A HeaderValueOption is its header plus the append action; the action part never changes.
_APPEND_ACTION = HeaderValueOption(append_action=OVERWRITE).SerializeToString()
_DECISION_KEY = _ld(_HV_KEY, DECISION_HEADER.encode())


def _decision_header(field: int, decision_id: bytes) -> bytes:
    return _ld(
        field, _ld(_OPT_HEADER, _DECISION_KEY + _ld(_HV_VALUE, decision_id)) + _APPEND_ACTION
    )


def _meta_entry(key: str, value: bytes) -> bytes:
    # map<string, Value> entry: key = 1, value = 2; Value.string_value = 3.
    return _ld(_STRUCT_FIELDS, _ld(1, key.encode()) + _ld(2, _ld(3, value)))


def www_authenticate(decision: Decision) -> str | None:
    """RFC 6750 §3: no error code when the request carried no credential at all."""
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


class ResponseEncoder:
    """Serialized CheckResponses for decisions; ``strip`` are the credential headers to remove
    upstream (read on every allow, so a policy reload takes effect at once)."""

    def __init__(self) -> None:
        self._identity: dict[str, tuple[Identity, tuple[str, ...], bytes]] = {}
        self._public: dict[tuple[str, ...], bytes] = {}
        self._denied: dict[tuple[Reason, str], tuple[bytes, bytes, bytes]] = {}
        self._reason_meta = {r: _meta_entry("reason", r.value.encode()) for r in Reason}

    def encode(self, decision: Decision, strip: tuple[str, ...]) -> bytes:
        did = decision.decision_id.encode()
        meta = _ld(_RESP_META, _meta_entry("decision_id", did) + self._reason_meta[decision.reason])
        if decision.outcome is Outcome.ALLOW:
            ok = _decision_header(_OK_HEADERS, did) + self._allow_part(decision.identity, strip)
            return _STATUS_OK + _ld(_RESP_OK, ok) + meta
        status, denied, body_prefix = self._deny_parts(decision)
        body = _ld(_DENIED_BODY, body_prefix + did + b'"}')
        denied_bytes = denied + _decision_header(_DENIED_HEADERS, did) + body
        return status + _ld(_RESP_DENIED, denied_bytes) + meta

    def _allow_part(self, ident: Identity | None, strip: tuple[str, ...]) -> bytes:
        if ident is None:
            part = self._public.get(strip)
            if part is None:
                part = ext.OkHttpResponse(
                    headers_to_remove=[*strip, *IDENTITY_HEADERS]
                ).SerializeToString()
                self._public[strip] = part
            return part
        cached = self._identity.get(ident.id)
        if cached is not None and cached[0] is ident and cached[1] == strip:
            return cached[2]
        part = self._identity_part(ident, strip)
        if len(self._identity) >= _CACHE_LIMIT:
            self._identity.clear()
        self._identity[ident.id] = (ident, strip, part)
        return part

    @staticmethod
    def _identity_part(ident: Identity, strip: tuple[str, ...]) -> bytes:
        values = (
            ident.workspace,
            ident.id if ident.kind == "api_key" else "",
            ident.subject,
            ident.client_id,
            " ".join(sort_scopes(ident.scopes)),
        )
        ok = ext.OkHttpResponse(headers_to_remove=strip)
        for name, value in zip(IDENTITY_HEADERS, values, strict=True):
            if value:
                ok.headers.add(header=HeaderValue(key=name, value=value), append_action=OVERWRITE)
            else:
                # Never let a client-supplied identity header through.
                ok.headers_to_remove.append(name)
        return bytes(ok.SerializeToString())

    def _deny_parts(self, decision: Decision) -> tuple[bytes, bytes, bytes]:
        key = (decision.reason, decision.detail)
        parts = self._denied.get(key)
        if parts is None:
            outcome = decision.outcome
            status = _ld(
                _RESP_STATUS,
                Status(code=GRPC_CODE[outcome], message=decision.reason.value).SerializeToString(),
            )
            denied = ext.DeniedHttpResponse(
                status=HttpStatus(code=decision.http_status),
                headers=[
                    HeaderValueOption(header=HeaderValue(key=k, value=v), append_action=OVERWRITE)
                    for k, v in (
                        ("content-type", "application/json"),
                        ("cache-control", "no-store"),
                    )
                ],
            )
            challenge = www_authenticate(decision)
            if challenge is not None:
                denied.headers.add(
                    header=HeaderValue(key="www-authenticate", value=challenge),
                    append_action=OVERWRITE,
                )
            error = "forbidden" if decision.reason is Reason.NO_ROUTE else _ERROR[outcome]
            prefix = json.dumps({"error": error, "reason": decision.reason.value})[:-1]
            parts = (status, denied.SerializeToString(), f'{prefix}, "decision_id": "'.encode())
            if len(self._denied) < 4096:
                self._denied[key] = parts
        return parts
