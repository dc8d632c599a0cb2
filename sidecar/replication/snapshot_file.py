"""The control plane's packed snapshot on disk (``<data_dir>/replication-snapshot.bin``): what a
restarted control plane serves its first sidecars from instead of reading and packing every key
again while its start-up sweeps compete for the same cores.

    magic b"SPSNAPSH" | version u32 | header length u32 | header (JSON)
    | table length u64 | the packed key table (sidecar/core/packed.py)
    | SHA-256 of everything before it

The header holds the change log's id, the revision the snapshot is complete up to, the
fingerprint of the change at that revision (``anchor``) and every other entry (signing keys'
public parts, revoked grants and token ids) as change entries. A file is used only when it is
whole (checksum), of this version, of the store's change log, not ahead of it, and the store's
change at its revision is still the one it was built after (a database restored from a backup
and written since reuses revision numbers); anything else is rebuilt from the store, never
served. The changes after its revision travel inside every snapshot served from it, as for a
snapshot built in memory (sidecar/replication/snapshots.py)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sidecar.core.models import Change

log = logging.getLogger("sidecar.replication")

FILE_NAME = "replication-snapshot.bin"
MAGIC = b"SPSNAPSH"
VERSION = 1
_HEAD = struct.Struct("<8sII")
_LEN = struct.Struct("<Q")
_SUM = hashlib.sha256().digest_size


class SnapshotFileError(ValueError):
    """A snapshot file that is truncated, altered, of another version or malformed."""


@dataclass(frozen=True, slots=True)
class PackedSnapshot:
    """Every key as one packed key table and every other entry, complete up to ``revision``
    of change log ``log_id``, whose change at ``revision`` has fingerprint ``anchor``."""

    log_id: str
    revision: int
    anchor: str
    packed: bytes
    entries: tuple[Change, ...]


def anchor_of(change: Change | None) -> str:
    """The fingerprint of a change-log entry ('' for none: an empty log)."""
    if change is None:
        return ""
    doc = [change.revision, change.kind, change.subject, change.payload]
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def encode(snap: PackedSnapshot) -> bytes:
    return b"".join(encoded_parts(snap))


def encoded_parts(snap: PackedSnapshot) -> list[bytes]:
    """``encode``'s bytes in pieces, the packed table itself among them (not a copy): a writer
    that takes them one by one never holds the table twice (70 MB at a million keys)."""
    header = json.dumps(
        {
            "log_id": snap.log_id,
            "revision": snap.revision,
            "anchor": snap.anchor,
            "entries": [[c.revision, c.kind, c.subject, c.payload] for c in snap.entries],
        },
        separators=(",", ":"),
    ).encode()
    parts = [_HEAD.pack(MAGIC, VERSION, len(header)), header, _LEN.pack(len(snap.packed))]
    parts.append(snap.packed)
    checksum = hashlib.sha256()
    for part in parts:
        checksum.update(part)
    parts.append(checksum.digest())
    return parts


def decode(data: bytes) -> PackedSnapshot:
    """The snapshot in ``data``; SnapshotFileError for anything but a whole, intact file of
    this version."""
    view = memoryview(data)
    if len(view) < _HEAD.size + _LEN.size + _SUM or bytes(view[:8]) != MAGIC:
        raise SnapshotFileError("not a snapshot file, or truncated")
    _, version, hlen = _HEAD.unpack_from(view)
    if version != VERSION:
        raise SnapshotFileError(f"version {version}, this control plane reads {VERSION}")
    body = view[:-_SUM]
    if hashlib.sha256(body).digest() != bytes(view[-_SUM:]):
        raise SnapshotFileError("checksum mismatch (truncated or altered)")
    try:
        at = _HEAD.size + hlen
        header = json.loads(bytes(body[_HEAD.size : at]))
        (size,) = _LEN.unpack_from(body, at)
        if at + _LEN.size + size != len(body):
            raise SnapshotFileError("the key table's length does not match the file")
        entries = tuple(Change(k, s, p, int(r)) for r, k, s, p in header["entries"])
        return PackedSnapshot(
            str(header["log_id"]),
            int(header["revision"]),
            str(header["anchor"]),
            bytes(body[at + _LEN.size :]),
            entries,
        )
    except (KeyError, TypeError, ValueError, struct.error) as exc:
        if isinstance(exc, SnapshotFileError):
            raise
        raise SnapshotFileError(f"malformed: {exc}") from exc


class SnapshotFile:
    """Reads and atomically replaces one snapshot file (mode 0600: key ids, digests and
    workspaces of every tenant, as in the database)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> PackedSnapshot | None:
        """The file's snapshot; None when there is none or it is unusable (logged)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cannot read the snapshot file", extra={"file": str(self.path),
                                                                 "error": str(exc)})  # fmt: skip
            return None
        try:
            return decode(data)
        except SnapshotFileError as exc:
            log.warning(
                "refusing the snapshot file; building the snapshot from the store",
                extra={"file": str(self.path), "error": str(exc)},
            )
            return None

    def save(self, snap: PackedSnapshot) -> None:
        """Write ``snap`` (temp file, fsync, rename: a reader sees the old file or the new
        one; two control planes sharing a directory never write into each other's temp)."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=self.path.name, suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                for part in encoded_parts(snap):
                    fh.write(part)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
