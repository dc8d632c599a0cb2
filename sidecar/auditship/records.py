"""Decision records as the sidecar builds them on the Check path: ids and names only. The
query string is cut off the path (it is where clients put ``?api_key=``); the writer thread
also redacts anything credential-shaped before the record reaches disk."""

from __future__ import annotations

from typing import NamedTuple

from sidecar.auditship.codec import encode
from sidecar.authz.decision import OUTCOMES, Decision, Identity, Outcome, Reason
from sidecar.core.audit import (
    AUTHZ_ALLOW,
    AUTHZ_DENY,
    AuditEvent,
    new_event_id,
    redact,
    scrub,
    secret_in,
)
from sidecar.core.audit_batch import MAX_FIELD
from sidecar.core.audit_chain import time_us
from sidecar.protowire import ld, uint, varint

ANONYMOUS = "anonymous"
MAX_PATH = 512


def request_path(path: str) -> str:
    """The path without query or fragment, bounded in length."""
    cut = len(path)
    for sep in ("?", "#"):
        i = path.find(sep)
        if i != -1:
            cut = min(cut, i)
    return path[: min(cut, MAX_PATH)]


def fit(value: str) -> str:
    """A request-controlled field (method, path, source) as ingest stores it: U+0000 as U+FFFD
    (PostgreSQL's text cannot hold NUL) and at most ``MAX_FIELD`` characters. Applied after
    redaction, which can lengthen a value ('Bearer x' becomes '[redacted]'). Ingest refuses a
    record that breaks either rule, so without this a caller of Check could keep its own
    decisions out of the trail (docs/security.md)."""
    if len(value) > MAX_FIELD or "\x00" in value:
        return value.replace("\x00", "\ufffd")[:MAX_FIELD]
    return value


def fit_request_fields(ev: AuditEvent) -> AuditEvent:
    """``ev`` with :func:`fit` applied to its target and its method and source entries."""
    metadata = ev.metadata
    fitted: dict[str, str] = {k: fit(metadata[k]) for k in ("method", "source") if k in metadata}
    target = fit(ev.target)
    if target == ev.target and all(fitted[k] == metadata[k] for k in fitted):
        return ev
    return ev._replace(target=target, metadata={**metadata, **fitted})


def decision_event(
    *,
    time: float,
    allowed: bool,
    reason: str,
    credential_id: str,
    workspace: str,
    method: str,
    path: str,
    source: str,
    decision_id: str,
    latency_s: float,
    extra: dict[str, str] | None = None,
) -> AuditEvent:
    """One ``authz.allow`` / ``authz.deny`` record. Its id is the decision id (the value sent
    upstream in x-statuspulse-decision-id), so a response and its record are joined by it."""
    return AuditEvent(
        id=decision_id or new_event_id(),
        time=time,
        actor=credential_id or ANONYMOUS,
        action=AUTHZ_ALLOW if allowed else AUTHZ_DENY,
        workspace=workspace,
        target=request_path(path),
        outcome="allow" if allowed else "deny",
        reason=reason,
        request_id=decision_id,
        metadata={
            "method": method,
            "source": source,
            "latency_us": str(round(latency_s * 1e6)),
            **(extra or {}),
        },
    )


class PendingDecision(NamedTuple):
    """What the Check path queues: the decision and the few request fields a record needs. The
    record itself (:meth:`event`) is built by the writer thread when it drains the queue, so the
    RPC thread spends a tuple, not a record."""

    decision: Decision
    method: str
    path: str
    source: str
    latency_s: float
    time: float

    def event(self) -> AuditEvent:
        decision = self.decision
        workspace, actor, extra = _who(decision.identity)
        return decision_event(
            time=self.time,
            allowed=decision.allowed,
            reason=decision.reason.value,
            credential_id=actor,
            workspace=workspace,
            method=self.method,
            path=self.path,
            source=self.source,
            decision_id=decision.decision_id,
            latency_s=self.latency_s,
            extra=extra,
        )

    def payload(self) -> bytes:
        """The spool payload (a serialized AuditRecord) of :meth:`event`, scrubbed — assembled
        by hand: a writer thread building and serializing protobuf objects spent ≈ 13 µs per
        record on the sidecar's CPU; this is ≈ 3 µs. Only the request's own fields (method,
        path, source) can carry a secret; the rest are ids and codes from the replica.
        tests/test_audit_ship.py checks it equals ``encode(scrub(event()))`` field for field."""
        decision = self.decision
        if not decision.decision_id:
            return encode(fit_request_fields(scrub(self.event())))
        method, target, source = self.method, request_path(self.path), self.source
        if secret_in(f"{method}\n{target}\n{source}"):
            method, target, source = redact(method), redact(target), redact(source)
        method, target, source = fit(method), fit(target), fit(source)
        us = time_us(self.time)
        did = decision.decision_id.encode()
        # Protobuf fields may come in any order; the part fixed by reason and identity is cached.
        return b"".join(
            (
                ld(1, did),
                ld(9, did),
                ld(2, uint(1, us // 1_000_000) + uint(2, us % 1_000_000 * 1000)),
                ld(6, target.encode()) if target else b"",
                _entry("method", method),
                _entry("source", source),
                _entry("latency_us", str(round(self.latency_s * 1e6))),
                fixed_part(decision),
            )
        )


def _who(identity: Identity | None) -> tuple[str, str, dict[str, str]]:
    """Workspace, actor and extra metadata of a decision record. An access token speaks for its
    subject; the token's jti and client go alongside."""
    if identity is None:
        return "", "", {}
    actor = identity.subject or identity.client_id or identity.id
    if identity.kind == "api_key":
        return identity.workspace, actor, {}
    return identity.workspace, actor, {"credential": identity.id, "client_id": identity.client_id}


# Fixed parts kept per identity: an API key's (its Identity lives as long as the replica keeps
# the key) up to FIXED_KEYS, an access token's up to FIXED_TOKENS. Each entry holds its Identity
# (≈ 0.9 KB with its strings), and a new token is a new identity: with the token cache off
# (`token_cache_size = 0`) every cold token's identity would otherwise stay here, ≈ 90 MB
# at 100,000 distinct tokens that nothing else keeps.
FIXED_KEYS = 100_000
FIXED_TOKENS = 4_096
_FIXED: dict[tuple[str, str], tuple[Identity | None, bytes]] = {}
_FIXED_TOKENS: dict[tuple[str, str], tuple[Identity | None, bytes]] = {}


def fixed_part(decision: Decision) -> bytes:
    """Fields 3, 4, 5, 7, 8 and the identity's metadata: the same for every record of one
    reason and identity (the identity object is compared, so a replaced key is rebuilt). The
    compiled Check path caches it per identity and writes the rest of the record in C."""
    identity = decision.identity
    reason = decision.reason
    if identity is None:
        key = (reason.value, "")
        memo, bound = _FIXED, FIXED_KEYS
    else:
        key = (reason.value, identity.id)
        token = identity.kind == "access_token"
        memo, bound = (_FIXED_TOKENS, FIXED_TOKENS) if token else (_FIXED, FIXED_KEYS)
    cached = memo.get(key)
    if cached is not None and cached[0] is identity:
        return cached[1]
    part = _fixed_part(reason, identity)
    if len(memo) >= bound:
        memo.clear()
    memo[key] = (identity, part)
    return part


def _fixed_part(reason: Reason, identity: Identity | None) -> bytes:
    """What :func:`fixed_part` caches, as ``_who`` and ``_entry`` would assemble it: built for
    every new access token (token cache off: every cold check), so from pieces made once per
    reason and metadata key (≈ 4.6 → ≈ 1.5 µs). tests/test_audit_ship.py compares it with the
    field-by-field assembly."""
    action, tail = _REASON_PARTS[reason]
    if identity is None:
        return _ANONYMOUS_ACTOR + action + tail
    workspace = identity.workspace
    actor = identity.subject or identity.client_id or identity.id
    part = _text(_ACTOR_TAG, actor) if actor else _ANONYMOUS_ACTOR
    part += action
    if workspace:
        part += _text(_WORKSPACE_TAG, workspace)
    part += tail
    if identity.kind == "api_key":
        return part
    return part + _meta(_CREDENTIAL_KEY, identity.id) + _meta(_CLIENT_ID_KEY, identity.client_id)


def _text(tag: bytes, value: str) -> bytes:
    """``ld(field, value.encode())``, the field's tag given encoded."""
    return _raw(tag, value.encode())


def _raw(tag: bytes, raw: bytes) -> bytes:
    n = len(raw)
    return tag + (_SMALL[n] if n < 128 else varint(n)) + raw


def _meta(key: bytes, value: str) -> bytes:
    """``_entry(name, value)``, ``key`` being ``ld(1, name.encode())``."""
    return _raw(_META_TAG, key + _text(_VALUE_TAG, value) if value else key)


# AuditRecord fields 4 (action) and 7 (outcome); 10 is the metadata map (entry: key 1, value 2).
_ALLOW_ACTION, _DENY_ACTION = ld(4, AUTHZ_ALLOW.encode()), ld(4, AUTHZ_DENY.encode())
_ALLOW_OUTCOME, _DENY_OUTCOME = ld(7, b"allow"), ld(7, b"deny")


def _entry(key: str, value: str) -> bytes:
    return ld(10, ld(1, key.encode()) + (ld(2, value.encode()) if value else b""))


_SMALL = [bytes([i]) for i in range(128)]
# The tags of AuditRecord fields 3 (actor), 5 (workspace), 10 (metadata) and of a map entry's
# value (2).
_ACTOR_TAG, _WORKSPACE_TAG, _META_TAG, _VALUE_TAG = (ld(n, b"")[:1] for n in (3, 5, 10, 2))
_ANONYMOUS_ACTOR = ld(3, ANONYMOUS.encode())
_CREDENTIAL_KEY, _CLIENT_ID_KEY = ld(1, b"credential"), ld(1, b"client_id")
# Per reason: its action (field 4), then its outcome (7) and code (8).
_REASON_PARTS: dict[Reason, tuple[bytes, bytes]] = {
    reason: (
        _ALLOW_ACTION if OUTCOMES[reason] is Outcome.ALLOW else _DENY_ACTION,
        (_ALLOW_OUTCOME if OUTCOMES[reason] is Outcome.ALLOW else _DENY_OUTCOME)
        + ld(8, reason.value.encode()),
    )
    for reason in Reason
}
