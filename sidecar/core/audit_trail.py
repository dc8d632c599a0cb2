"""The audit trail use cases: list, follow, export, verify, ingest and prune. Every read needs
``admin:full`` in the workspace concerned, or the operator key (workspace ``*``)."""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from sidecar.core import permissions, validation
from sidecar.core.audit import AuditEvent, AuditQuery, redact
from sidecar.core.audit_batch import (
    NO_WORKSPACE,
    EventBatch,
    PreparedBatch,
    Refusal,
    RefusalReason,
)
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
from sidecar.core.storage import IdAlreadyStored, Store, UnitOfWork

log = logging.getLogger("sidecar.audit")

# Per batch of a call: the batch, its refusals so far, its first copies (id -> position) and
# the identical copies after them; once stored, with the ids acknowledged and how many were new.
_FirstCopies = tuple[PreparedBatch, list[Refusal], dict[str, int], list[tuple[int, str]]]
_Staged = tuple[PreparedBatch, list[Refusal], list[tuple[int, str]], list[str], int]

# A sidecar shipping decision records, authenticated by the sync token: it may ingest, nothing
# else (no scopes, so every read refuses it).
SIDECAR = Principal(key_id="sidecar", workspace=OPERATOR_WORKSPACE, scopes=frozenset())


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
        """Store decision records shipped by a sidecar (see ``ingest_batch``), checked by the
        Python path (``EventBatch``)."""
        permissions.require_sidecar(ctx.principal, SIDECAR, "decision records")
        return self.ingest_batch(ctx, EventBatch(list(events), self.latest_record_time()))

    def latest_record_time(self) -> float:
        """The newest record time ingest accepts now (a batch is checked against it)."""
        return self._clock.now() + self.policy.max_future_skew

    def ingest_batch(self, ctx: RequestContext, batch: PreparedBatch) -> IngestResult:
        """Store decision records shipped by a sidecar, once each, in one transaction. Only a
        sidecar (the sync token) writes them: an API key, even ``admin:full``, could otherwise
        claim a decision id before the sidecar's record arrives. A record whose id is stored
        already (or came earlier in the batch) is acknowledged only when it is that same record
        (a re-send); different content under a stored id is refused (``conflicts`` counts
        them), as is a malformed record: each refusal is reported with its reason and the rest
        of the batch is stored and acknowledged. ``batch`` was checked against
        ``latest_record_time()``."""
        return self.ingest_batches(ctx, [batch])[0]

    def ingest_batches(
        self, ctx: RequestContext, batches: Sequence[PreparedBatch]
    ) -> list[IngestResult]:
        """``ingest_batch`` for each of ``batches`` in turn, all in one transaction (one commit
        for the messages of a call: on SQLite a commit writes every page the records dirtied,
        and a random decision id dirties a page of the id index of its own). Each batch sees
        the ones before it as stored, as in separate calls; one result per batch."""
        permissions.require_sidecar(ctx.principal, SIDECAR, "decision records")
        for batch in batches:
            if batch.size > self.policy.max_ingest_batch:
                raise InvalidArgument(
                    "records", f"at most {self.policy.max_ingest_batch} per message"
                )
        firsts = []
        for batch in batches:
            refused = list(batch.refused)
            first, repeated = self._first_copies(batch, refused)
            firsts.append((batch, refused, first, repeated))
        try:
            # The steady state: nothing re-sent. The ids go in without a lookup (a statement
            # per message and a probe of the id index per record); the id index refuses a
            # stored one, which voids the transaction, and the call is stored again with the
            # lookup, so a re-send costs a second transaction.
            staged, cursor = self._store_all(firsts, look_up=False)
        except IdAlreadyStored:
            log.debug("audit ingest: a record id is stored already; storing with a lookup")
            staged, cursor = self._store_all(firsts, look_up=True)
        results = [self._result(*s, cursor) for s in staged]
        if self._on_ingested is not None:
            for result in results:
                self._on_ingested(result)
        return results

    def _store_all(self, firsts: list[_FirstCopies], *, look_up: bool) -> tuple[list[_Staged], int]:
        """Each batch's first copies stored, in one transaction; with ``look_up``, stored ids
        are found first (re-sends acknowledged, conflicts refused), else a stored id raises
        ``IdAlreadyStored``. Returns what ``_result`` needs per batch and the trail's end."""
        staged: list[_Staged] = []
        with self._store.transaction() as uow:
            for batch, refused_before, first, repeated in firsts:
                refused = list(refused_before)  # a second attempt starts from the same ones
                acknowledged, new = self._store_new(uow, batch, first, refused, look_up)
                staged.append((batch, refused, repeated, acknowledged, len(new)))
            cursor = uow.audit.last_seq()
        return staged, cursor

    def _store_new(
        self,
        uow: UnitOfWork,
        batch: PreparedBatch,
        first: dict[str, int],
        refused: list[Refusal],
        look_up: bool,
    ) -> tuple[list[str], list[int]]:
        """Insert the first copies whose id is not stored; returns the ids acknowledged (new or
        re-sent) and the positions inserted. A stored id with other content is refused."""
        known = uow.audit.get_many(first.keys()) if look_up else {}
        if not known:  # the steady state: nothing re-sent, every first copy is new
            new = list(first.values())
            uow.audit.append_batch(batch, new)
            return list(first), new
        acknowledged: list[str] = []
        new = []
        for ev_id, index in first.items():
            stored_ev = known.get(ev_id)
            if stored_ev is None:
                new.append(index)
                acknowledged.append(ev_id)
            elif canonical(stored_ev, 0, "") == batch.content(index):
                acknowledged.append(ev_id)  # a re-send (compared as stored: scrubbed)
            else:
                refused.append(self._conflict(ev_id, batch.workspace(index), index))
        uow.audit.append_batch(batch, new)
        return acknowledged, new

    def _result(
        self,
        batch: PreparedBatch,
        refused: list[Refusal],
        repeated: list[tuple[int, str]],
        acknowledged: list[str],
        stored: int,
        cursor: int,
    ) -> IngestResult:
        # A copy repeated within the batch shares its first copy's fate.
        accepted = set(acknowledged) if repeated else set()
        for index, ev_id in repeated:
            if ev_id in accepted:
                acknowledged.append(ev_id)
            else:
                refused.append(self._conflict(ev_id, batch.workspace(index), index))
        refused.sort(key=lambda r: r.index)
        return IngestResult(acknowledged, stored, cursor, refused)

    def _first_copies(
        self, batch: PreparedBatch, refused: list[Refusal]
    ) -> tuple[dict[str, int], list[tuple[int, str]]]:
        """The well-formed records' first copies (id -> position) and the identical copies
        after them; a later copy with other content goes to ``refused``."""
        first: dict[str, int] = {}
        repeated: list[tuple[int, str]] = []
        for index, ev_id in batch.accepted:
            at = first.get(ev_id)
            if at is None:
                first[ev_id] = index
            elif batch.content(at) == batch.content(index):
                repeated.append((index, ev_id))
            else:
                refused.append(self._conflict(ev_id, batch.workspace(index), index))
        return first, repeated

    def _conflict(self, ev_id: str, workspace: str, index: int) -> Refusal:
        self.conflicts += 1
        if self._on_conflict is not None:
            self._on_conflict()
        log.warning(
            "audit ingest: a record differs from the stored one with its id",
            extra={"event_id": ev_id, "workspace": workspace},
        )
        return Refusal(
            redact(ev_id),
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
