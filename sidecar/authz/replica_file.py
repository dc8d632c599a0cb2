"""The persisted replica's format (``replica.bin``, version 2): what a restarted sidecar serves
from before the control plane answers.

    magic b"SPREPLIC" | version u32 | header length u32 | header (JSON)
    | table length u64 | the snapshot's packed key table (sidecar/core/packed.py)
    | overlay length u64 | the keys changed since, as a second packed key table
    | hidden length u64 | digests (32 bytes each) of the table's keys that are gone
    | SHA-256 of everything before it

The header holds the revision, the change log's id, when the control plane was last heard, and
every other entry (signing keys' public parts, revoked grants and token ids) as change entries.
All integers little-endian. A file that is truncated, altered, of another version or otherwise
malformed is refused whole (``ReplicaError``): the sidecar then waits for a snapshot (fails
closed) rather than serve a partial replica. Version 1 was the JSON document ``replica.json``
(``{"format": 1, ...}``), still read once on upgrade."""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

from sidecar.authz.replica import Replica, ReplicaError, _Keys, _table, message_of
from sidecar.core.models import Change
from sidecar.core.packed import DIGEST_SIZE, PackedKeys, PackError

MAGIC = b"SPREPLIC"
VERSION = 2
_HEAD = struct.Struct("<8sII")
_LEN = struct.Struct("<Q")
_SUM = hashlib.sha256().digest_size


def encode(replica: Replica) -> bytes:
    """The file's bytes for ``replica`` (its writer holds the replica's lock)."""
    return b"".join(encoded_parts(replica))


def encoded_parts(replica: Replica) -> list[bytes]:
    """``encode``'s bytes in pieces, the last one the SHA-256 trailer: written one by one, a
    million keys' file costs ≈ 20 B/key beside the replica instead of three copies of it."""
    keys = replica._keys
    header = json.dumps(
        {
            "revision": replica.revision,
            "log_id": replica.log_id,
            "last_contact": replica.last_contact,
            "entries": [
                {"kind": c.kind, "subject": c.subject, "payload": c.payload}
                for c in replica.other_entries()
            ],
        },
        separators=(",", ":"),
    ).encode()
    overlay = PackedKeys.pack(message_of(d, c) for d, c in keys.overlay.items() if c is not None)
    hidden = b"".join(d for d, c in keys.overlay.items() if c is None)
    parts = [_HEAD.pack(MAGIC, VERSION, len(header)), header]
    for section in (keys.table.packed.encoded_parts(), overlay.encoded_parts(), [hidden]):
        parts += [_LEN.pack(sum(map(len, section))), *section]
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return [*parts, digest.digest()]


def decode(replica: Replica, data: bytes) -> None:
    """Restore ``replica`` from a file's bytes; ReplicaError (and ``replica`` unchanged) for
    anything but a whole, intact file of a known version."""
    if data[:1] == b"{":
        _decode_json(replica, data)
        return
    view = memoryview(data)
    if len(view) < _HEAD.size + _SUM or bytes(view[:8]) != MAGIC:
        raise ReplicaError("unreadable replica file: not a replica file, or truncated")
    _, version, hlen = _HEAD.unpack_from(view)
    if version != VERSION:
        raise ReplicaError(f"unreadable replica file: version {version}, this sidecar reads 2")
    body, digest = view[:-_SUM], bytes(view[-_SUM:])
    if hashlib.sha256(body).digest() != digest:
        raise ReplicaError("unreadable replica file: checksum mismatch (truncated or altered)")
    try:
        at = _HEAD.size + hlen
        header = json.loads(bytes(body[_HEAD.size : at]))
        sections: list[memoryview] = []
        for _ in range(3):
            (size,) = _LEN.unpack_from(body, at)
            sections.append(body[at + _LEN.size : at + _LEN.size + size])
            at += _LEN.size + size
            if len(sections[-1]) != size:
                raise ReplicaError("unreadable replica file: a section is truncated")
        if at != len(body):
            raise ReplicaError("unreadable replica file: trailing data")
        base = PackedKeys.decode(sections[0])
        overlay = PackedKeys.decode(sections[1])
        hidden = bytes(sections[2])
        if len(hidden) % DIGEST_SIZE:
            raise ReplicaError("unreadable replica file: a hidden digest is truncated")
        entries = [Change(e["kind"], e["subject"], e["payload"]) for e in header["entries"]]
        revision = int(header["revision"])
        log_id = str(header["log_id"])
        last_contact = float(header["last_contact"])
    except (PackError, KeyError, TypeError, ValueError, struct.error) as exc:
        if isinstance(exc, ReplicaError):
            raise
        raise ReplicaError(f"unreadable replica file: {exc}") from exc
    fresh = Replica()
    fresh.load_packed(revision, base, entries, log_id)
    keys: _Keys = fresh._keys
    extra = _table(lambda: overlay)
    for row in range(len(extra)):
        digest = overlay.digest_at(row)
        keys.overlay[digest] = extra.credential_at(row)
        keys.overlay_ids[overlay.id_at(row)] = digest
    for at in range(0, len(hidden), DIGEST_SIZE):
        keys.overlay[hidden[at : at + DIGEST_SIZE]] = None
    replica._install(fresh, revision, log_id)
    # Staleness counts from the last time the control plane was heard, not from the restart.
    replica.last_contact = last_contact


def _decode_json(replica: Replica, data: bytes) -> None:
    """Version 1, ``replica.json``: every entry as JSON."""
    try:
        doc: Any = json.loads(data)
        if doc.get("format") != 1:
            raise ReplicaError("unknown replica file format")
        entries = [Change(e["kind"], e["subject"], e["payload"]) for e in doc["entries"]]
        revision = int(doc["revision"])
        log_id = str(doc.get("log_id", ""))  # files written before it existed: unknown
        last_contact = float(doc.get("last_contact", 0.0))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, ReplicaError):
            raise
        raise ReplicaError(f"unreadable replica file: {exc}") from exc
    replica.load_snapshot(revision, entries, log_id)
    replica.last_contact = last_contact


# -- the change log beside it ---------------------------------------------------------------------
#
# ``replica.log``: the changes applied since ``replica.bin`` was written, so a persist appends a
# few records instead of rewriting the whole file (≈ 70 MB at a million keys).
#
#     magic b"SPRLOG01" | the SHA-256 trailer of the replica.bin it follows
#     then records: body length u32 | body (JSON [revision, kind, subject, payload, last_contact])
#                   | SHA-256 of the log's magic, the base's trailer and the body
#
# A log whose base is not the replica.bin beside it (a crash between writing the two) is ignored
# whole. Records replay in order up to the first one that is incomplete or altered (a torn
# write): the replica is then at an earlier revision, as if the process had stopped before
# writing the rest, and resumes from it.

LOG_MAGIC = b"SPRLOG01"
_U32 = struct.Struct("<I")


def base_sum(data: bytes) -> bytes:
    """The trailer of a replica file's bytes (its SHA-256), which names it in a log."""
    return data[-_SUM:]


def log_header(base: bytes) -> bytes:
    return LOG_MAGIC + base


def log_records(base: bytes, changes: list[Change], last_contact: float) -> bytes:
    """The records of ``changes`` for a log whose base trailer is ``base``."""
    out = []
    for c in changes:
        body = json.dumps(
            [c.revision, c.kind, c.subject, c.payload, last_contact], separators=(",", ":")
        ).encode()
        out += [_U32.pack(len(body)), body, hashlib.sha256(LOG_MAGIC + base + body).digest()]
    return b"".join(out)


def read_log(data: bytes, base: bytes) -> tuple[list[tuple[Change, float]], int, bool]:
    """The records of a log following the replica file whose trailer is ``base``: (each change
    with the contact time written with it, the length of the intact part, whether the whole log
    was intact). A log of another base yields nothing."""
    head = log_header(base)
    if not data.startswith(head):
        return [], 0, not data
    out: list[tuple[Change, float]] = []
    at = len(head)
    while at < len(data):
        if at + _U32.size > len(data):
            return out, at, False
        (size,) = _U32.unpack_from(data, at)
        body = data[at + _U32.size : at + _U32.size + size]
        digest = data[at + _U32.size + size : at + _U32.size + size + _SUM]
        if len(body) != size or digest != hashlib.sha256(LOG_MAGIC + base + body).digest():
            return out, at, False
        try:
            revision, kind, subject, payload, contact = json.loads(body)
            out.append((Change(str(kind), str(subject), payload, int(revision)), float(contact)))
        except (TypeError, ValueError):
            return out, at, False
        at += _U32.size + size + _SUM
    return out, at, True
