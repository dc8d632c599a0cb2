"""The audit trail use cases: list, follow, export, verify, ingest and prune. Every read needs
``admin:full`` in the workspace concerned, or the operator key (workspace ``*``)."""

from __future__ import annotations

import base64
import binascii
import enum
import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from sidecar.core import permissions, validation
from sidecar.core.audit import DECISION_ACTIONS, AuditEvent, AuditQuery, redact, scrub
from sidecar.core.audit_chain import (
    ChainBreak,
    ChainedRecord,
    ChainReport,
    ChainVerifier,
    Link,
    Problem,
    SignedHeads,
    canonical,
    heads_valid,
    sign_checkpoint,
    sign_heads,
)
from sidecar.core.clock import Clock
from sidecar.core.errors import FailedPrecondition, InvalidArgument
from sidecar.core.models import OPERATOR_WORKSPACE, Principal, RequestContext
from sidecar.core.storage import Store, UnitOfWork

log = logging.getLogger("sidecar.audit")

# Decision records whose credential named no workspace (an unknown or malformed key) are kept
# in a chain of their own, visible to the operator only.
NO_WORKSPACE = "-"
# A sidecar shipping decision records, authenticated by the sync token: it may ingest, nothing
# else (no scopes, so every read refuses it).
SIDECAR = Principal(key_id="sidecar", workspace=OPERATOR_WORKSPACE, scopes=frozenset())
_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_MAX_FIELD = 512
_MAX_METADATA = 32


@dataclass(frozen=True, slots=True)
class AuditPolicy:
    """Paging and batching limits."""

    default_page_size: int = 50
    max_page_size: int = 1000
    batch: int = 500
    max_ingest_batch: int = 1000
    # Ingest refuses a record dated more than this many seconds after the control plane's clock
    # (a record from the future would sit at the top of every listing).
    max_future_skew: float = 300.0


@dataclass(frozen=True, slots=True)
class AuditPage:
    """One page of a listing, newest first."""

    items: list[ChainedRecord]
    next_token: str = ""


class RefusalReason(enum.StrEnum):
    """Why ingest refused a record: stable codes (the wire's AuditRefusalReason)."""

    NOT_A_DECISION = "not_a_decision"
    MALFORMED_ID = "malformed_id"
    MISSING_TIME = "missing_time"
    FUTURE_TIME = "future_time"
    TOO_LARGE = "too_large"
    MALFORMED_WORKSPACE = "malformed_workspace"
    CONFLICT = "conflict"


@dataclass(frozen=True, slots=True)
class Refusal:
    """A shipped record ingest refused: its id (as sent, cut to 64 characters and redacted), the
    field at fault, why in words (never a value of the record) and as a code, and its position
    in the batch given to ``ingest`` (the exact record, whatever its id)."""

    id: str
    field: str
    message: str
    reason: RefusalReason
    index: int

    def __str__(self) -> str:
        return f"{self.id!r}: {self.field}: {self.message}"


class _Refused(Exception):
    """A record fails a check of ``_checked_decision`` (becomes a Refusal, never escapes)."""

    def __init__(self, reason: RefusalReason, field: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class IngestResult:
    """Ids now stored (by this call or an earlier one), how many were new, the trail end, and
    the records refused (stored under no id; the rest of their batch is)."""

    acknowledged: list[str]
    stored: int
    cursor: int
    refused: list[Refusal] = field(default_factory=list)


class AuditTrail:
    """Audit use cases over a store; transports call these and map their errors."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        checkpoint_key: bytes,
        policy: AuditPolicy | None = None,
        on_conflict: Callable[[], None] | None = None,
        on_ingested: Callable[[IngestResult], None] | None = None,
    ) -> None:
        self._store = store
        self._on_conflict = on_conflict
        self._on_ingested = on_ingested  # after each committed ingest (metrics)
        self._clock = clock
        self._key = checkpoint_key
        self.policy = policy or AuditPolicy()
        self.conflicts = 0  # ingested records refused: their id was stored with other content

    # -- reads ------------------------------------------------------------------------------

    def query(
        self,
        ctx: RequestContext,
        *,
        workspace: str = "",
        action: str = "",
        actor: str = "",
        since: float | None = None,
        until: float | None = None,
    ) -> AuditQuery:
        """A query limited to what the caller may see; refuses a workspace it may not."""
        return AuditQuery(
            workspaces=visible_workspaces(ctx.principal, workspace),
            action=action or None,
            actor=actor or None,
            since=since,
            until=until,
        )

    def page(self, query: AuditQuery, *, page_size: int = 0, page_token: str = "") -> AuditPage:
        """Matching records newest first (by record time), one page at a time."""
        size = page_size or self.policy.default_page_size
        if not 1 <= size <= self.policy.max_page_size:
            raise InvalidArgument("page_size", f"must be between 1 and {self.policy.max_page_size}")
        before = _decode_token(page_token) if page_token else None
        with self._store.read() as uow:
            items = uow.audit.page(query, size + 1, before)
        more = len(items) > size
        items = items[:size]
        last = items[-1] if more else None
        token = _encode_token(last.event.time, last.seq) if last else ""
        return AuditPage(items=items, next_token=token)

    def after(
        self, query: AuditQuery, cursor: int, limit: int = 0
    ) -> tuple[list[ChainedRecord], int]:
        """Matching records in storage order after ``cursor`` (tail and export), and how far the
        scan got: a filtered follower resumes there, not at its last match, so it never rescans
        rows that did not match (storage positions are assigned in commit order)."""
        limit = limit or self.policy.batch
        with self._store.read() as uow:
            end = uow.audit.last_seq()
            found = uow.audit.after(cursor, query, limit)
        scanned = found[-1].seq if len(found) == limit else max(cursor, end)
        return found, scanned

    def end(self) -> int:
        """The cursor of the newest stored record (a tail with no cursor starts here)."""
        with self._store.read() as uow:
            return uow.audit.last_seq()

    # -- verification -----------------------------------------------------------------------

    def verify(self, ctx: RequestContext, workspace: str = "") -> list[ChainReport]:
        """Walk each visible workspace's chain; each report names its first broken link. The
        newest signed heads (signed with the key outside the database) add what a chain walk
        alone cannot see: a chain shorter than its signed head, rewritten from it, or gone."""
        visible = visible_workspaces(ctx.principal, workspace)
        with self._store.read() as uow:
            present = uow.audit.workspaces()
            signed = uow.audit.latest_signed_heads()
        heads = signed.heads if signed is not None else {}
        names = sorted(w for w in {*present, *heads} if visible is None or w in visible)
        if workspace and workspace not in names:
            names = [workspace]  # an empty chain verifies; say so rather than print nothing
        forged = signed is not None and not heads_valid(self._key, signed)
        reports = []
        for name in names:
            if forged:
                reports.append(_heads_forged(name))
            elif name not in present and name in heads:
                reports.append(_chain_gone(name, heads[name]))
            else:
                reports.append(self.verify_one(name, signed=heads.get(name)))
        return reports

    def sign_heads(self) -> bool:
        """Sign the head of every chain now, unless nothing moved since the newest signed heads
        (a periodic signed checkpoint; the control plane calls it every audit_sign_interval).
        Returns whether it stored new signed heads."""
        with self._store.transaction() as uow:
            current: dict[str, Link] = {}
            for name in uow.audit.workspaces():
                link = uow.audit.head(name)
                if link is not None:
                    current[name] = link
            latest = uow.audit.latest_signed_heads()
            if latest is not None:
                # Never sign over tampering: that would make it the new truth.
                problem = _drifted(uow, latest, current, self._key)
                if problem:
                    raise FailedPrecondition(f"not signing audit heads: {problem}")
                if latest.heads == {w: (k.chain_seq, k.digest) for w, k in current.items()}:
                    return False
            uow.audit.add_signed_heads(sign_heads(self._key, current, self._clock.now()))
        return True

    def verify_one(
        self, workspace: str, through: int | None = None, signed: tuple[int, str] | None = None
    ) -> ChainReport:
        """Walk one chain (up to chain position ``through``) in batches, each in its own read,
        so the trail is never held in memory whole; ``signed`` is its last signed head."""
        with self._store.read() as uow:
            checkpoint = uow.audit.checkpoint(workspace)
        verifier = ChainVerifier(workspace, checkpoint, self._key, signed)
        while not verifier.broken:
            limit = self.policy.batch
            if through is not None:
                limit = min(limit, through - verifier.resume_after)
                if limit <= 0:
                    break
            with self._store.read() as uow:
                batch = uow.audit.chain(workspace, verifier.resume_after, limit)
            if not batch:
                break
            verifier.feed(batch)
        return verifier.report()

    # -- writes -----------------------------------------------------------------------------

    def ingest(self, ctx: RequestContext, events: Iterable[AuditEvent]) -> IngestResult:
        """Store decision records shipped by a sidecar, once each, in one transaction. Only a
        sidecar (the sync token) writes them: an API key, even ``admin:full``, could otherwise
        claim a decision id before the sidecar's record arrives. A record whose id is stored
        already (or came earlier in the batch) is acknowledged only when it is that same record
        (a re-send); different content under a stored id is refused (``conflicts`` counts
        them), as is a malformed record: each refusal is reported with its reason and the rest
        of the batch is stored and acknowledged."""
        permissions.require_sidecar(ctx.principal, SIDECAR, "decision records")
        incoming = list(events)
        if len(incoming) > self.policy.max_ingest_batch:
            raise InvalidArgument("records", f"at most {self.policy.max_ingest_batch} per message")
        refused: list[Refusal] = []
        batch = self._checked_batch(incoming, refused)
        acknowledged: list[str] = []
        with self._store.transaction() as uow:
            known = uow.audit.get_many(batch.first.keys())
            new = []
            for ev_id, (index, ev) in batch.first.items():
                stored_ev = known.get(ev_id)
                if stored_ev is None:
                    new.append(ev)
                    acknowledged.append(ev_id)
                elif same_record(stored_ev, ev):
                    acknowledged.append(ev_id)
                else:
                    refused.append(self._conflict(ev, index))
            uow.audit.append_new(new)
            cursor = uow.audit.last_seq()
        # A copy repeated within the batch shares its first copy's fate.
        accepted = set(acknowledged)
        for index, ev in batch.repeated:
            if ev.id in accepted:
                acknowledged.append(ev.id)
            else:
                refused.append(self._conflict(ev, index))
        refused.sort(key=lambda r: r.index)
        result = IngestResult(acknowledged, len(new), cursor, refused)
        if self._on_ingested is not None:
            self._on_ingested(result)
        return result

    def _checked_batch(self, events: list[AuditEvent], refused: list[Refusal]) -> _Batch:
        """The well-formed records by id, first copy kept; malformed ones go to ``refused``,
        as does a second copy with other content (same content: acknowledged with the first)."""
        latest = self._clock.now() + self.policy.max_future_skew
        batch = _Batch({}, [])
        valid_workspaces: set[str] = set()
        for index, raw in enumerate(events):
            try:
                ev = _checked_decision(raw, latest, valid_workspaces)
            except _Refused as exc:
                # The id goes back in the call's answer and into the sidecar's log: cut, redacted.
                refused.append(
                    Refusal(redact(raw.id[:64]), exc.field, exc.message, exc.reason, index)
                )
                continue
            first = batch.first.get(ev.id)
            if first is None:
                batch.first[ev.id] = (index, ev)
            elif same_record(scrub(first[1]), ev):
                batch.repeated.append((index, ev))
            else:
                refused.append(self._conflict(ev, index))
        return batch

    def _conflict(self, ev: AuditEvent, index: int) -> Refusal:
        self.conflicts += 1
        if self._on_conflict is not None:
            self._on_conflict()
        log.warning(
            "audit ingest: a record differs from the stored one with its id",
            extra={"event_id": ev.id, "workspace": ev.workspace},
        )
        return Refusal(
            redact(ev.id),
            "records.id",
            "the id is stored already with different content",
            RefusalReason.CONFLICT,
            index,
        )

    def prune(self, before: float) -> int:
        """Retention: in every chain, delete the longest prefix of records older than
        ``before``, leaving a signed checkpoint so the rest still verifies. A chain that does
        not verify is left whole (the evidence is kept); returns records deleted."""
        with self._store.read() as uow:
            names = uow.audit.workspaces()
        deleted = 0
        refused: list[str] = []
        for name in names:
            with self._store.read() as uow:
                point = uow.audit.prune_point(name, before)
            if point is None:
                continue
            # Only what is about to be deleted needs checking: it is vouched for from now on
            # by the checkpoint's signature alone.
            report = self.verify_one(name, through=point.chain_seq)
            if report.first_break is not None:
                refused.append(f"{name!r}: {report.first_break.detail}")
                continue
            checkpoint = sign_checkpoint(self._key, name, point, self._clock.now())
            with self._store.transaction() as uow:
                deleted += uow.audit.prune(checkpoint)
        if refused:
            raise FailedPrecondition(f"not pruning broken chains: {'; '.join(refused)}")
        return deleted


@dataclass(frozen=True, slots=True)
class _Batch:
    """An ingest batch's well-formed records by id (first copy), and identical copies after,
    each with its position in the batch."""

    first: dict[str, tuple[int, AuditEvent]]
    repeated: list[tuple[int, AuditEvent]]


def _drifted(uow: UnitOfWork, latest: SignedHeads, current: dict[str, Link], key: bytes) -> str:
    """Why the trail no longer extends ``latest`` ('' when it does): a forged signature, a
    chain gone or shorter, or another record where a signed head was."""
    if not heads_valid(key, latest):
        return "the newest signed heads do not match their signature"
    for workspace, (seq, digest_hex) in latest.heads.items():
        link = current.get(workspace)
        if link is None or link.chain_seq < seq:
            return f"chain {workspace!r} is shorter than its last signed head"
        at = uow.audit.chain(workspace, seq - 1, 1)
        if at and at[0].link.chain_seq == seq and at[0].link.digest != digest_hex:
            return f"chain {workspace!r} was rewritten from its last signed head"
    return ""


def _chain_gone(workspace: str, signed: tuple[int, str]) -> ChainReport:
    brk = ChainBreak(
        Problem.CHAIN_MISSING,
        "",
        0,
        f"the chain had {signed[0]} records when its head was last signed and now has none",
    )
    return ChainReport(workspace, 0, None, 0, brk)


def _heads_forged(workspace: str) -> ChainReport:
    brk = ChainBreak(
        Problem.HEADS_INVALID,
        "",
        0,
        "the newest signed heads do not match their signature: they were written without the "
        "audit signing key",
    )
    return ChainReport(workspace, 0, None, 0, brk)


def visible_workspaces(principal: Principal, workspace: str) -> frozenset[str] | None:
    """The workspaces the caller may read (None: all); ``workspace`` narrows it to one."""
    if workspace:
        if workspace not in (OPERATOR_WORKSPACE, NO_WORKSPACE):
            validation.workspace(workspace)
        permissions.require(principal, workspace)
        return frozenset({workspace})
    permissions.require(principal, principal.workspace)
    return None if principal.is_operator else frozenset({principal.workspace})


def same_record(stored: AuditEvent, incoming: AuditEvent) -> bool:
    """Whether ``incoming`` is a re-send of ``stored`` (compared as stored: scrubbed, time to
    the microsecond the chain hashes)."""
    return canonical(stored, 0, "") == canonical(scrub(incoming), 0, "")


def _checked_decision(ev: AuditEvent, latest: float, valid_workspaces: set[str]) -> AuditEvent:
    """Sidecars may ship decision records only, with bounded fields (a compromised sidecar
    must not be able to forge ``key.revoked`` or flood the store with huge rows), dated no
    later than ``latest``. ``valid_workspaces`` remembers names already checked in a batch.
    Raises ``_Refused``, whose message never quotes the record (it reaches the sidecar's log)."""
    if ev.action not in DECISION_ACTIONS:
        raise _Refused(
            RefusalReason.NOT_A_DECISION,
            "records.action",
            f"expected one of {sorted(DECISION_ACTIONS)}",
        )
    if not _ID.fullmatch(ev.id):
        raise _Refused(
            RefusalReason.MALFORMED_ID, "records.id", "expected 1-64 characters [A-Za-z0-9._:-]"
        )
    if ev.time <= 0:
        raise _Refused(RefusalReason.MISSING_TIME, "records.time", "must be set")
    if ev.time > latest:
        raise _Refused(
            RefusalReason.FUTURE_TIME,
            "records.time",
            "is in the future (beyond the allowed clock skew)",
        )
    longest = max(
        len(ev.actor), len(ev.workspace), len(ev.target), len(ev.outcome), len(ev.reason),
        len(ev.request_id),
    )  # fmt: skip
    if longest > _MAX_FIELD or len(ev.metadata) > _MAX_METADATA:
        raise _Refused(
            RefusalReason.TOO_LARGE, "records", f"fields are limited to {_MAX_FIELD} characters"
        )
    for k, v in ev.metadata.items():
        if len(k) > 64 or len(v) > _MAX_FIELD:
            raise _Refused(RefusalReason.TOO_LARGE, "records.metadata", "entry too long")
    workspace = ev.workspace
    if not workspace:
        return ev._replace(workspace=NO_WORKSPACE)
    if workspace not in valid_workspaces and workspace not in (NO_WORKSPACE, OPERATOR_WORKSPACE):
        # '*': the operator key's decisions, in the operator chain.
        try:
            validation.workspace(workspace, "records.workspace")
        except InvalidArgument:
            raise _Refused(
                RefusalReason.MALFORMED_WORKSPACE,
                "records.workspace",
                "malformed workspace: use 1-63 lower-case letters, digits and dashes",
            ) from None
        valid_workspaces.add(workspace)
    return ev


def encode_cursor(seq: int) -> str:
    """A cursor as clients see it (opaque; today the decimal storage position)."""
    return str(seq)


def decode_cursor(text: str) -> int:
    """The storage position in a cursor; empty means 'not given' (-1)."""
    if not text:
        return -1
    if not text.isdigit() or len(text) > 18:
        raise InvalidArgument("cursor", "malformed cursor")
    return int(text)


def _encode_token(time: float, seq: int) -> str:
    raw = json.dumps([time, seq]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str) -> tuple[float, int]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        time, seq = json.loads(raw)
        if not isinstance(time, int | float) or not isinstance(seq, int):
            raise ValueError
    except (ValueError, binascii.Error, TypeError):
        raise InvalidArgument("page_token", "malformed page token") from None
    return float(time), seq
