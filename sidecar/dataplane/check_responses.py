"""CheckResponse bytes, assembled from cached pieces.

Building a CheckResponse as protobuf objects costs ~10 µs per call in Python (every header is a
message, every field a C call); the framework itself costs ~150 µs per call, so that is most of
our budget. Protobuf's wire format is concatenative — repeated fields may arrive in several runs
and a message field is a tag, a length and bytes — so the parts that depend only on the identity
or the reason are serialized once by protobuf itself and cached, and each call adds only its
decision id. tests/test_check_responses.py parses every shape back with the real CheckResponse
class."""

from __future__ import annotations

import functools
import itertools
import json
import math

from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.auth.v3 import external_auth_pb2 as ext
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.protobuf.struct_pb2 import Struct
from google.rpc.status_pb2 import Status

from sidecar.authz.decision import Decision, Identity, Outcome, Reason
from sidecar.core.scopes import sort_scopes
from sidecar.protowire import ld as _ld

OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
DECISION_HEADER = "x-statuspulse-decision-id"
IDENTITY_HEADERS = (
    "x-statuspulse-workspace",
    "x-statuspulse-key-id",
    "x-statuspulse-subject",
    "x-statuspulse-client-id",
    "x-statuspulse-scopes",
)
OPERATOR_WORKSPACE = "*"


def _spellings(name: str) -> list[str]:
    """Every spelling of ``name`` with '-' and '_' swapped at its separators: many upstreams
    (CGI, WSGI, Rails, PHP) read ``x_statuspulse_workspace`` as ``x-statuspulse-workspace``,
    and Envoy passes underscores unless told to reject them. Envoy lower-cases names, so case
    needs no spellings of its own."""
    parts = name.split("-")
    return [
        "".join(p + s for p, s in zip(parts, (*seps, ""), strict=True))
        for seps in itertools.product("-_", repeat=len(parts) - 1)
    ]


# Spellings that are never ours: removed from every allowed request, so only the headers this
# sidecar sets (hyphenated) reach the upstream.
FOREIGN_SPELLINGS = tuple(
    alt for name in (DECISION_HEADER, *IDENTITY_HEADERS) for alt in _spellings(name) if alt != name
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
_DENIED_LIMIT = 4096


def _field(name: str, message: type) -> int:
    return int(message.DESCRIPTOR.fields_by_name[name].number)  # type: ignore[attr-defined]


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


# The dynamic metadata's reason entry, per reason (the same for every response).
_REASON_META = {r: _meta_entry("reason", r.value.encode()) for r in Reason}


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
    upstream (read on every allow, so a policy reload takes effect at once).

    A response differs from the previous one of the same shape (identity or denial reason,
    ``strip``, length of the decision id) only in its decision id, so each shape is built once
    with a placeholder id, split there, and later answers are ``decision_id.join(pieces)``.
    An allow's shape is templated on the second answer of the same identity object: a shape
    answered once (each new access token), or a token verified again (a new Identity each time),
    is built once per answer."""

    def __init__(self, failure_window: float = 60.0) -> None:
        # Retry-After of a 429 for a blocked source or key id (the block ends within a window).
        self.failure_retry = max(1, math.ceil(failure_window))
        # (reason, identity id, id length) -> (identity the pieces were built for, strip, pieces)
        self._allow: dict[
            tuple[Reason, str, int], tuple[Identity | None, tuple[str, ...], list[bytes]]
        ] = {}
        # Allow shapes answered once (by a full build) and not yet templated -> the id() of the
        # identity answered (a reused address only costs a template, never a wrong answer).
        self._seen_once: dict[tuple[Reason, str, int], int] = {}
        # (reason, detail, id length) -> pieces: a denial names no identity and strips nothing
        self._denied: dict[tuple[Reason, str, int], list[bytes]] = {}

    def encode(self, decision: Decision, strip: tuple[str, ...]) -> bytes:
        did = decision.decision_id.encode()
        reason = decision.reason
        if reason is Reason.OK or reason is Reason.PUBLIC_ROUTE:
            ident = decision.identity
            key = (reason, "" if ident is None else ident.id, len(did))
            cached = self._allow.get(key)
            if cached is not None and cached[0] is ident and cached[1] == strip:
                return did.join(cached[2])
            if self._seen_once.get(key) != id(ident):
                # A template costs two builds and serves only this very identity object (the
                # check above): made on its second answer, so a shape seen once (every new
                # access token's jti) costs one build, not three, and so does a token verified
                # again into a new Identity (token cache off), whose template nothing would use.
                if len(self._seen_once) >= _CACHE_LIMIT:
                    self._seen_once.clear()
                self._seen_once[key] = id(ident)
                return self.build(decision, strip)
            pieces = self._template(decision, strip)
            if pieces is None:
                return self.build(decision, strip)
            if len(self._allow) >= _CACHE_LIMIT:
                self._allow.clear()
            self._allow[key] = (ident, strip, pieces)
            return did.join(pieces)
        detail = decision.detail
        if reason is Reason.RATE_LIMITED:  # the Retry-After is part of the response's shape
            detail = f"{detail}:{self.retry_after(decision)}"
        dkey = (reason, detail, len(did))
        pieces = self._denied.get(dkey)
        if pieces is None:
            if len(self._denied) >= _DENIED_LIMIT:  # details are bounded; never build twice
                return self.build(decision, strip)
            pieces = self._template(decision, strip)
            if pieces is None:
                return self.build(decision, strip)
            self._denied[dkey] = pieces
        return did.join(pieces)

    def _template(self, decision: Decision, strip: tuple[str, ...]) -> list[bytes] | None:
        """The response for ``decision``'s shape, split where the decision id goes, and checked
        against the response built for ``decision`` itself; None if they differ (the
        placeholder also occurred elsewhere), and the caller builds piece by piece."""
        n = len(decision.decision_id)
        # Border-free (its first character occurs nowhere else in it), so an occurrence found
        # by split can never start inside a length prefix in front of the real slot.
        placeholder = "\x01" + "\x02" * (n - 1)
        pieces = self.build(decision._replace(decision_id=placeholder), strip).split(
            placeholder.encode()
        )
        if not n or decision.decision_id.encode().join(pieces) != self.build(decision, strip):
            return None
        return pieces

    def build(self, decision: Decision, strip: tuple[str, ...]) -> bytes:
        """The response assembled piece by piece (no whole-response cache)."""
        did = decision.decision_id.encode()
        n = len(did)
        if decision.outcome is Outcome.ALLOW:
            # Every allow of a new access token comes here: what surrounds the id is looked up
            # by the id's length (_HEADS), not length-prefixed piece by piece.
            ok = _ok_id_head(n) + did + _APPEND_ACTION + _allow_part(decision.identity, strip)
            meta = _meta_head(decision.reason, n) + did + _REASON_META[decision.reason]
            return _STATUS_OK + _ld(_RESP_OK, ok) + meta
        meta = _ld(_RESP_META, _meta_entry("decision_id", did) + _REASON_META[decision.reason])
        status, denied, body_prefix = _deny_parts(decision, self.retry_after(decision))
        body = _ld(_DENIED_BODY, body_prefix + did + b'"}')
        denied_bytes = denied + _decision_header(_DENIED_HEADERS, did) + body
        return status + _ld(_RESP_DENIED, denied_bytes) + meta

    def retry_after(self, decision: Decision) -> int | None:
        """RFC 9110 §10.2.3 Retry-After for a 429: an upper bound on the wait. A key over its own
        rate frees a slot within its period (the window slides); a blocked source or key id is
        let in again within the failure window. None for every other decision."""
        if decision.reason is not Reason.RATE_LIMITED:
            return None
        ident = decision.identity
        if decision.detail == "rate" and ident is not None and ident.rate_period:
            return max(1, ident.rate_period)
        return self.failure_retry


def _allow_part(ident: Identity | None, strip: tuple[str, ...]) -> bytes:
    if ident is None:
        remove = [*strip, *IDENTITY_HEADERS, *FOREIGN_SPELLINGS]
        return bytes(ext.OkHttpResponse(headers_to_remove=remove).SerializeToString())
    workspace = ident.workspace
    values = (
        # The operator's '*' never reaches an upstream: it would read as "every workspace".
        "" if workspace == OPERATOR_WORKSPACE else workspace,
        ident.id if ident.kind == "api_key" else "",
        ident.subject,
        ident.client_id,
        " ".join(sort_scopes(ident.scopes)) if ident.scopes else "",
    )
    # The OkHttpResponse protobuf would serialize, assembled from pre-encoded pieces (its
    # fields in number order: headers, then headers_to_remove in list order); building the
    # message cost ≈ 15 µs, paid once per identity: for every new access token, so the loop
    # is kept plain (no zip, no lists: 3.9 → ≈ 2.4 µs).
    # tests/test_check_responses.py compares the two on every shape.
    headers = empty = b""
    for slot in _SLOTS:
        value = values[slot]
        if value:
            raw = value.encode()
            head = _HEADS.get((slot, len(raw))) or _identity_head(slot, len(raw))
            headers += head + raw + _APPEND_ACTION
        else:
            # Never let a client-supplied identity header through.
            empty += _IDENTITY_REMOVALS[slot]
    return headers + _removals(strip) + empty


_SLOTS = range(len(IDENTITY_HEADERS))
_OK_REMOVE = _field("headers_to_remove", ext.OkHttpResponse)
_IDENTITY_KEYS = tuple(_ld(_HV_KEY, name.encode()) for name in IDENTITY_HEADERS)
_IDENTITY_REMOVALS = tuple(_ld(_OK_REMOVE, name.encode()) for name in IDENTITY_HEADERS)
_FOREIGN_REMOVALS = b"".join(_ld(_OK_REMOVE, name.encode()) for name in FOREIGN_SPELLINGS)


# What comes before a value of each length in a header or the metadata (a header's value sits
# right before its append action, the decision id's metadata entry right before the reason's):
# the nested length prefixes depend on the value's length only, so each is built once around a
# placeholder of that length and looked up after. Keyed by (identity header slot 0-4, length),
# (-1, length) for the decision-id header, (reason, length) for the metadata: a Reason is a
# str, never equal to an int. Bounded: cleared when full.
_HEADS: dict[tuple[int | Reason, int], bytes] = {}
_HEADS_MAX = 4096


def _head(key: tuple[int | Reason, int], whole: bytes, after: int) -> bytes:
    """``whole`` (built around a placeholder of ``key[1]`` bytes, ``after`` bytes before its
    end) up to the placeholder, kept under ``key``."""
    head = whole[: len(whole) - key[1] - after]
    if len(_HEADS) >= _HEADS_MAX:
        _HEADS.clear()
    _HEADS[key] = head
    return head


def _identity_head(slot: int, n: int) -> bytes:
    """An identity header (``IDENTITY_HEADERS[slot]``) up to its ``n``-byte value."""
    key = (slot, n)
    head = _HEADS.get(key)
    if head is None:
        value = _ld(_HV_VALUE, b"\x00" * n)
        option = _ld(_OPT_HEADER, _IDENTITY_KEYS[slot] + value) + _APPEND_ACTION
        head = _head(key, _ld(_OK_HEADERS, option), len(_APPEND_ACTION))
    return head


def _ok_id_head(n: int) -> bytes:
    """An allow's decision-id header up to its ``n``-byte id."""
    key = (-1, n)
    head = _HEADS.get(key)
    if head is None:
        whole = _decision_header(_OK_HEADERS, b"\x00" * n)
        head = _head(key, whole, len(_APPEND_ACTION))
    return head


def _meta_head(reason: Reason, n: int) -> bytes:
    """The dynamic metadata up to an ``n``-byte decision id (its entry, then the reason's)."""
    key = (reason, n)
    head = _HEADS.get(key)
    if head is None:
        reason_meta = _REASON_META[reason]
        whole = _ld(_RESP_META, _meta_entry("decision_id", b"\x00" * n) + reason_meta)
        head = _head(key, whole, len(reason_meta))
    return head


@functools.lru_cache(maxsize=16)
def _removals(strip: tuple[str, ...]) -> bytes:
    """``strip`` then the foreign spellings as headers_to_remove entries (one per policy)."""
    return b"".join(_ld(_OK_REMOVE, name.encode()) for name in strip) + _FOREIGN_REMOVALS


def _deny_parts(decision: Decision, retry_after: int | None) -> tuple[bytes, bytes, bytes]:
    outcome = decision.outcome
    status = _ld(
        _RESP_STATUS,
        Status(code=GRPC_CODE[outcome], message=decision.reason.value).SerializeToString(),
    )
    denied = ext.DeniedHttpResponse(
        status=HttpStatus(code=decision.http_status),
        headers=[
            HeaderValueOption(header=HeaderValue(key=k, value=v), append_action=OVERWRITE)
            for k, v in (("content-type", "application/json"), ("cache-control", "no-store"))
        ],
    )
    if retry_after is not None:
        denied.headers.add(
            header=HeaderValue(key="retry-after", value=str(retry_after)), append_action=OVERWRITE
        )
    challenge = www_authenticate(decision)
    if challenge is not None:
        denied.headers.add(
            header=HeaderValue(key="www-authenticate", value=challenge), append_action=OVERWRITE
        )
    error = "forbidden" if decision.reason is Reason.NO_ROUTE else _ERROR[outcome]
    prefix = json.dumps({"error": error, "reason": decision.reason.value})[:-1]
    return status, denied.SerializeToString(), f'{prefix}, "decision_id": "'.encode()
