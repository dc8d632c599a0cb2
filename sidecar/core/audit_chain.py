"""Tamper evidence for the audit trail: one SHA-256 hash chain per workspace.

Each stored record carries its position in its workspace's chain (``chain_seq`` = 1, 2, ...),
the digest of the record before it (``prev_digest``; 64 zeros for the first) and its own digest,
``SHA-256(canonical(record))``, where the canonical form covers every field *and* the two link
fields. So editing a record breaks its own digest, deleting one leaves a gap in ``chain_seq``, and
re-hashing an edited record breaks the next record's link. Retention pruning removes a chain's
prefix and leaves a ``Checkpoint`` (the last pruned record's position and digest) signed with
HMAC-SHA256 under a server key, so the remaining chain still verifies from a trusted start.

Pure: no I/O. The store computes links inside the appending transaction; ``ChainVerifier``
walks a chain in batches so a long trail is never loaded whole.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _esc
from typing import NamedTuple

from sidecar.core.audit import AuditEvent

FORMAT_VERSION = 1
GENESIS = "0" * 64


class Link(NamedTuple):
    """A record's place in its workspace's chain (a NamedTuple: one is built per record
    ingested or read, see ``AuditEvent``)."""

    chain_seq: int
    prev_digest: str
    digest: str


@dataclass(frozen=True, slots=True)
class ChainedRecord:
    """A stored record: the event, its storage position ``seq`` and its chain link."""

    event: AuditEvent
    seq: int
    link: Link


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Where a pruned chain resumes: the last pruned record's position and digest."""

    workspace: str
    chain_seq: int
    digest: str
    time: float
    signature: str


def time_us(seconds: float) -> int:
    """Record time in the canonical form: integer microseconds since the epoch."""
    return round(seconds * 1_000_000)


def metadata_json(metadata: Mapping[str, str]) -> str | None:
    """Metadata as the canonical form holds it (compact, sorted, ASCII JSON); None when a key
    or value is not a string (never written by this product; ``canonical`` then takes its
    reference path). The store keeps this same text, so a record's metadata is encoded once."""
    try:
        return "{" + ",".join([_esc(k) + ":" + _esc(v) for k, v in sorted(metadata.items())]) + "}"
    except TypeError:
        return None


def canonical(ev: AuditEvent, chain_seq: int, prev_digest: str, meta: str | None = None) -> bytes:
    """The bytes a record's digest covers: compact JSON, sorted keys, ASCII only, so any
    language can reproduce them (docs/audit.md, "Chain format"). ``meta``: the record's
    ``metadata_json`` when the caller has it already.

    Written out in sorted key order with the json module's own string escaper: the same bytes
    as ``canonical_reference`` (tests compare the two on generated records) at a tenth of its
    cost, which every ingested record pays."""
    if meta is None:
        meta = metadata_json(ev.metadata)
        if meta is None:
            return canonical_reference(ev, chain_seq, prev_digest)
    return (
        f'{{"action":{_esc(ev.action)},"actor":{_esc(ev.actor)},"chain_seq":{int(chain_seq)},'
        f'"id":{_esc(ev.id)},"metadata":{meta},"outcome":{_esc(ev.outcome)},'
        f'"prev_digest":{_esc(prev_digest)},"reason":{_esc(ev.reason)},'
        f'"request_id":{_esc(ev.request_id)},"target":{_esc(ev.target)},'
        f'"time_us":{time_us(ev.time)},"v":{FORMAT_VERSION},"workspace":{_esc(ev.workspace)}}}'
    ).encode()


def canonical_reference(ev: AuditEvent, chain_seq: int, prev_digest: str) -> bytes:
    """The canonical form as its definition states it (a dict through ``json.dumps``)."""
    body = {
        "v": FORMAT_VERSION,
        "id": ev.id,
        "time_us": time_us(ev.time),
        "actor": ev.actor,
        "action": ev.action,
        "workspace": ev.workspace,
        "target": ev.target,
        "outcome": ev.outcome,
        "reason": ev.reason,
        "request_id": ev.request_id,
        "metadata": dict(ev.metadata),
        "chain_seq": chain_seq,
        "prev_digest": prev_digest,
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def digest(ev: AuditEvent, chain_seq: int, prev_digest: str, meta: str | None = None) -> str:
    """Hex SHA-256 of the canonical form."""
    return hashlib.sha256(canonical(ev, chain_seq, prev_digest, meta)).hexdigest()


def next_link(ev: AuditEvent, head: Link | None, meta: str | None = None) -> Link:
    """The link for ``ev`` appended after ``head`` (None: the chain is empty)."""
    chain_seq = head.chain_seq + 1 if head else 1
    prev = head.digest if head else GENESIS
    return Link(chain_seq, prev, digest(ev, chain_seq, prev, meta))


def _checkpoint_bytes(workspace: str, chain_seq: int, digest_hex: str, time: float) -> bytes:
    body = {
        "v": FORMAT_VERSION,
        "kind": "checkpoint",
        "workspace": workspace,
        "chain_seq": chain_seq,
        "digest": digest_hex,
        "time_us": time_us(time),
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign_checkpoint(key: bytes, workspace: str, last: Link, time: float) -> Checkpoint:
    """A checkpoint after ``last`` (the last record being pruned), signed with ``key``."""
    mac = hmac.new(key, _checkpoint_bytes(workspace, last.chain_seq, last.digest, time), "sha256")
    return Checkpoint(workspace, last.chain_seq, last.digest, time, mac.hexdigest())


def checkpoint_valid(key: bytes, cp: Checkpoint) -> bool:
    """True when ``cp`` was signed with ``key`` and not altered since."""
    expected = hmac.new(
        key, _checkpoint_bytes(cp.workspace, cp.chain_seq, cp.digest, cp.time), "sha256"
    )
    return hmac.compare_digest(expected.hexdigest(), cp.signature)


@dataclass(frozen=True, slots=True)
class SignedHeads:
    """Every chain's head at one moment, signed with the audit signing key (which is kept
    outside the database, the same on every replica). ``body`` is the exact signed text."""

    body: str
    signature: str

    @property
    def heads(self) -> dict[str, tuple[int, str]]:
        """workspace -> (chain_seq, digest) of its head when signed."""
        raw = json.loads(self.body)["heads"]
        return {str(w): (int(v[0]), str(v[1])) for w, v in raw.items()}


def sign_heads(key: bytes, heads: Mapping[str, Link], time: float) -> SignedHeads:
    """Sign the heads of every chain (a periodic signed checkpoint of the whole trail)."""
    body = json.dumps(
        {
            "v": FORMAT_VERSION,
            "kind": "heads",
            "time_us": time_us(time),
            "heads": {w: [link.chain_seq, link.digest] for w, link in sorted(heads.items())},
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return SignedHeads(body, hmac.new(key, body.encode(), "sha256").hexdigest())


def heads_valid(key: bytes, signed: SignedHeads) -> bool:
    """True when ``signed`` was signed with ``key`` and not altered since."""
    expected = hmac.new(key, signed.body.encode(), "sha256").hexdigest()
    return hmac.compare_digest(expected, signed.signature)


class Problem(enum.StrEnum):
    """What is wrong at a chain's first broken link."""

    DIGEST_MISMATCH = "digest_mismatch"
    LINK_MISMATCH = "link_mismatch"
    MISSING = "missing"
    CHECKPOINT_INVALID = "checkpoint_invalid"
    TRUNCATED = "truncated"
    HEAD_MISMATCH = "head_mismatch"
    CHAIN_MISSING = "chain_missing"
    HEADS_INVALID = "heads_invalid"


@dataclass(frozen=True, slots=True)
class ChainBreak:
    """The first broken link: which record, and why."""

    problem: Problem
    record_id: str
    chain_seq: int
    detail: str


@dataclass(frozen=True, slots=True)
class ChainReport:
    """The result of verifying one workspace's chain."""

    workspace: str
    records_checked: int
    head: Link | None
    checkpoint_chain_seq: int
    first_break: ChainBreak | None

    @property
    def ok(self) -> bool:
        return self.first_break is None


class ChainVerifier:
    """Walks one workspace's chain in ``chain_seq`` order, fed in batches; stops at the first
    broken link. Tail truncation (deleting the newest records) leaves a valid shorter chain:
    compare ``head`` with an anchored copy to catch it (docs/audit.md)."""

    def __init__(
        self,
        workspace: str,
        checkpoint: Checkpoint | None,
        key: bytes | None,
        signed: tuple[int, str] | None = None,
    ) -> None:
        self.workspace = workspace
        self._checkpoint = checkpoint
        # (chain_seq, digest) of this chain's last signed head: the chain must still reach it,
        # with that very record there.
        self._signed = signed
        self._checked = 0
        self._break: ChainBreak | None = None
        self._head: Link | None = None
        if checkpoint is not None:
            self._head = Link(checkpoint.chain_seq, "", checkpoint.digest)
            if key is None or not checkpoint_valid(key, checkpoint):
                self._break = ChainBreak(
                    Problem.CHECKPOINT_INVALID,
                    "",
                    checkpoint.chain_seq,
                    "the retention checkpoint's signature does not match its content",
                )

    @property
    def broken(self) -> bool:
        return self._break is not None

    @property
    def resume_after(self) -> int:
        """The chain_seq to read after next."""
        return self._head.chain_seq if self._head else 0

    def feed(self, records: Iterable[ChainedRecord]) -> bool:
        """Check the next records; False once a link is broken (stop feeding then)."""
        for record in records:
            if self._break is not None:
                return False
            self._break = self._check(record)
            if self._break is None:
                self._head = record.link
                self._checked += 1
        return self._break is None

    def _check(self, record: ChainedRecord) -> ChainBreak | None:
        ev, link = record.event, record.link
        if digest(ev, link.chain_seq, link.prev_digest) != link.digest:
            return ChainBreak(
                Problem.DIGEST_MISMATCH,
                ev.id,
                link.chain_seq,
                f"record {ev.id} (chain position {link.chain_seq}) does not match its digest: "
                "it was edited after it was stored",
            )
        expected = self.resume_after + 1
        if link.chain_seq != expected:
            return ChainBreak(
                Problem.MISSING,
                ev.id,
                link.chain_seq,
                f"chain positions {expected}..{link.chain_seq - 1} are missing before record "
                f"{ev.id}",
            )
        prev = self._head.digest if self._head else GENESIS
        if not hmac.compare_digest(link.prev_digest, prev):
            before = "the checkpoint" if self._checked == 0 and self._checkpoint else "the record"
            return ChainBreak(
                Problem.LINK_MISMATCH,
                ev.id,
                link.chain_seq,
                f"record {ev.id} (chain position {link.chain_seq}) does not link to {before} "
                f"before it: one of the two was replaced",
            )
        signed = self._signed
        if (
            signed is not None
            and link.chain_seq == signed[0]
            and not hmac.compare_digest(link.digest, signed[1])
        ):
            return ChainBreak(
                Problem.HEAD_MISMATCH,
                ev.id,
                link.chain_seq,
                f"record {ev.id} (chain position {link.chain_seq}) is not the record the last "
                "signed head names: the chain was rewritten from there",
            )
        return None

    def _short(self) -> ChainBreak | None:
        """The chain ends before its last signed head (checked once the walk is done)."""
        signed = self._signed
        reached = self._head.chain_seq if self._head else 0
        if signed is None or reached >= signed[0]:
            return None
        return ChainBreak(
            Problem.TRUNCATED,
            "",
            reached,
            f"the chain ends at position {reached} but its last signed head is at position "
            f"{signed[0]}: {signed[0] - reached} newest records were deleted",
        )

    def report(self) -> ChainReport:
        return ChainReport(
            workspace=self.workspace,
            records_checked=self._checked,
            head=self._head,
            checkpoint_chain_seq=self._checkpoint.chain_seq if self._checkpoint else 0,
            first_break=self._break or self._short(),
        )


def verify(
    workspace: str,
    records: Iterable[ChainedRecord],
    checkpoint: Checkpoint | None = None,
    key: bytes | None = None,
) -> ChainReport:
    """Verify a whole chain held in memory (the store uses ``ChainVerifier`` in batches)."""
    verifier = ChainVerifier(workspace, checkpoint, key)
    verifier.feed(records)
    return verifier.report()
