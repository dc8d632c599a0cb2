"""A batch of shipped decision records as ingest takes it: each record checked (a malformed one
becomes a ``Refusal`` with a stable reason), scrubbed, and its canonical form ready to be linked
into its workspace's chain. ``EventBatch`` builds one from events in Python: the reference. The
compiled step (sidecar/core/audit_native.py) builds the same from a message's bytes, and
tests/test_audit_native.py holds the two to identical refusals, contents and rows."""

from __future__ import annotations

import enum
import json
import re
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sidecar.core import validation
from sidecar.core.audit import DECISION_ACTIONS, AuditEvent, redact, scrub, secret_in
from sidecar.core.audit_chain import Link, canonical, metadata_json, next_link
from sidecar.core.errors import InvalidArgument

# Decision records whose credential named no workspace (an unknown or malformed key) are kept
# in a chain of their own, visible to the operator only.
NO_WORKSPACE = "-"
OPERATOR_CHAIN = "*"  # the operator key's decisions
_CHAINS = (NO_WORKSPACE, OPERATOR_CHAIN)
_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
MAX_FIELD = 512
MAX_METADATA = 32
MAX_METADATA_KEY = 64

# A row as the store inserts it: id, time, actor, action, workspace, target, outcome, reason,
# request_id, metadata (its canonical JSON), chain_seq, prev_digest, digest.
Row = tuple[Any, ...]


class RefusalReason(enum.StrEnum):
    """Why ingest refused a record: stable codes (the wire's AuditRefusalReason)."""

    NOT_A_DECISION = "not_a_decision"
    MALFORMED_ID = "malformed_id"
    MISSING_TIME = "missing_time"
    FUTURE_TIME = "future_time"
    TOO_LARGE = "too_large"
    MALFORMED_WORKSPACE = "malformed_workspace"
    CONFLICT = "conflict"
    NUL_CHARACTER = "nul_character"


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


# Every check a record can fail, in the order they run (the compiled step returns 1 + the
# position here, so this table is its only copy of the words).
CHECKS: tuple[tuple[RefusalReason, str, str], ...] = (
    (RefusalReason.NOT_A_DECISION, "records.action", f"expected one of {sorted(DECISION_ACTIONS)}"),
    (
        RefusalReason.MALFORMED_ID,
        "records.id",
        "expected 1-64 characters [A-Za-z0-9._:-], not shaped like a credential",
    ),
    (RefusalReason.MISSING_TIME, "records.time", "must be set"),
    (
        RefusalReason.FUTURE_TIME,
        "records.time",
        "is in the future (beyond the allowed clock skew)",
    ),
    (RefusalReason.TOO_LARGE, "records", f"fields are limited to {MAX_FIELD} characters"),
    (RefusalReason.TOO_LARGE, "records.metadata", "entry too long"),
    (
        RefusalReason.MALFORMED_WORKSPACE,
        "records.workspace",
        "malformed workspace: use 1-63 lower-case letters, digits and dashes",
    ),
    (RefusalReason.NUL_CHARACTER, "records", "a field holds U+0000 (NUL)"),
)
(
    NOT_A_DECISION,
    MALFORMED_ID,
    MISSING_TIME,
    FUTURE_TIME,
    TOO_LARGE,
    ENTRY_TOO_LONG,
    MALFORMED_WORKSPACE,
    NUL_CHARACTER,
) = range(len(CHECKS))


class Refused(Exception):
    """A record fails check ``CHECKS[check]`` (becomes a Refusal, never escapes ingest)."""

    def __init__(self, check: int) -> None:
        super().__init__(CHECKS[check][2])
        self.check = check

    def refusal(self, raw_id: str, index: int) -> Refusal:
        """The Refusal of the record with id ``raw_id`` at ``index``: its id goes back in the
        call's answer and into the sidecar's log, so cut and redacted."""
        reason, field, message = CHECKS[self.check]
        return Refusal(redact(raw_id[:64]), field, message, reason, index)


def checked_decision(ev: AuditEvent, latest: float, valid_workspaces: set[str]) -> AuditEvent:
    """Sidecars may ship decision records only, with bounded fields (a compromised sidecar
    must not be able to forge ``key.revoked`` or flood the store with huge rows), dated no
    later than ``latest``. ``valid_workspaces`` remembers names already checked in a batch.
    Raises ``Refused``, whose message never quotes the record (it reaches the sidecar's log)."""
    if ev.action not in DECISION_ACTIONS:
        raise Refused(NOT_A_DECISION)
    # An id shaped like a credential would be stored as it is (ids are not redacted: they
    # name the record), so it is refused like any malformed id.
    if not _ID.fullmatch(ev.id) or secret_in(ev.id):
        raise Refused(MALFORMED_ID)
    if ev.time <= 0:
        raise Refused(MISSING_TIME)
    if ev.time > latest:
        raise Refused(FUTURE_TIME)
    longest = max(
        len(ev.actor), len(ev.workspace), len(ev.target), len(ev.outcome), len(ev.reason),
        len(ev.request_id),
    )  # fmt: skip
    if longest > MAX_FIELD or len(ev.metadata) > MAX_METADATA:
        raise Refused(TOO_LARGE)
    for k, v in ev.metadata.items():
        if len(k) > MAX_METADATA_KEY or len(v) > MAX_FIELD:
            raise Refused(ENTRY_TOO_LONG)
    workspace = ev.workspace
    if workspace and workspace not in valid_workspaces and workspace not in _CHAINS:
        try:
            validation.workspace(workspace, "records.workspace")
        except InvalidArgument:
            raise Refused(MALFORMED_WORKSPACE) from None
        valid_workspaces.add(workspace)
    # PostgreSQL's text cannot hold NUL: stored, it would fail the whole message on every
    # retry (a direct caller of Check controls the method, path and source a record names).
    if "\x00" in f"{ev.actor}{ev.target}{ev.outcome}{ev.reason}{ev.request_id}" or any(
        "\x00" in k or "\x00" in v for k, v in ev.metadata.items()
    ):
        raise Refused(NUL_CHARACTER)
    return ev if workspace else ev._replace(workspace=NO_WORKSPACE)


class PreparedBatch(Protocol):
    """One message's records, checked and scrubbed. ``accepted`` lists the well-formed ones
    (position in the message, id) in order; ``content`` is a record's canonical form outside
    any chain (chain_seq 0, prev_digest ""), what a re-send is compared by."""

    size: int
    report_refused: bool
    refused: list[Refusal]
    accepted: list[tuple[int, str]]

    def content(self, index: int) -> bytes: ...

    def workspace(self, index: int) -> str: ...

    def workspaces(self, indices: Sequence[int]) -> list[str]:
        """The distinct workspaces of the records at ``indices``, in order of appearance."""
        ...

    def rows(self, indices: Sequence[int], heads: MutableMapping[str, Any]) -> list[Row]:
        """The records at ``indices`` linked in that order after ``heads`` (workspace -> its
        chain's head ``Link`` or None, one entry for each of their workspaces; updated)."""
        ...


class EventBatch:
    """A PreparedBatch from events, in Python (the reference; the fallback of the compiled
    step)."""

    def __init__(
        self, events: Sequence[AuditEvent], latest: float, *, report_refused: bool = False
    ) -> None:
        self.size = len(events)
        self.report_refused = report_refused
        self.refused: list[Refusal] = []
        self.accepted: list[tuple[int, str]] = []
        self._events: dict[int, AuditEvent] = {}
        valid_workspaces: set[str] = set()
        for index, raw in enumerate(events):
            try:
                ev = checked_decision(raw, latest, valid_workspaces)
            except Refused as exc:
                self.refused.append(exc.refusal(raw.id, index))
                continue
            self._events[index] = scrub(ev)
            self.accepted.append((index, ev.id))

    def content(self, index: int) -> bytes:
        return canonical(self._events[index], 0, "")

    def workspace(self, index: int) -> str:
        return self._events[index].workspace

    def workspaces(self, indices: Sequence[int]) -> list[str]:
        return list(dict.fromkeys([self._events[i].workspace for i in indices]))

    def rows(self, indices: Sequence[int], heads: MutableMapping[str, Any]) -> list[Row]:
        return linked_rows([self._events[i] for i in indices], heads)


def linked_rows(events: Sequence[AuditEvent], heads: MutableMapping[str, Any]) -> list[Row]:
    """Scrubbed ``events`` as rows, each linked after its workspace's head in ``heads``
    (updated as they are linked)."""
    rows = []
    for ev in events:
        # Stored as the chain hashes it (compact JSON): encoded once, read back by json.
        meta = metadata_json(ev.metadata)
        link: Link = next_link(ev, heads[ev.workspace], meta)
        heads[ev.workspace] = link
        rows.append((*_fields(ev, meta), link.chain_seq, link.prev_digest, link.digest))
    return rows


def _fields(ev: AuditEvent, meta: str | None) -> tuple[Any, ...]:
    # meta None: a value that is not a str (never from a sidecar's record; see metadata_json).
    return (
        ev.id, ev.time, ev.actor, ev.action, ev.workspace, ev.target, ev.outcome, ev.reason,
        ev.request_id, json.dumps(ev.metadata, sort_keys=True) if meta is None else meta,
    )  # fmt: skip
