"""The replica feed: one thread holds a ReplicationService.Subscribe stream to a control plane,
applies the snapshot and changes in order, reconnects with backoff, resumes from its revision, and
persists the replica to disk so the sidecar can start and serve while the control plane is down.

With several control-plane replicas (``--control-plane a:50051,b:50051``) the client moves to the
next one when its stream fails or falls silent, and resumes there from its revision: every
replica serves the same change log from the shared database, so nothing is missed."""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc

from sidecar._gen.statuspulse.auth.v1 import replication_pb2 as pb
from sidecar._gen.statuspulse.auth.v1 import replication_pb2_grpc as pb_grpc
from sidecar.authz import replica_file
from sidecar.authz.replica import Replica, ReplicaError
from sidecar.core.clock import Clock
from sidecar.core.models import Change
from sidecar.core.packed import PackedKeys, PackError

log = logging.getLogger("sidecar.sync")
SNAPSHOT_FILE = "replica.bin"
LEGACY_SNAPSHOT_FILE = "replica.json"  # format 1, read once on upgrade
LOG_FILE = "replica.log"  # the changes since replica.bin
LOG_MIN_BYTES = 1 << 20  # below this the log is never compacted into a whole save


def from_pb(change: pb.ReplicaChange) -> Change:
    return Change(
        kind=change.kind,
        subject=change.subject,
        payload=json.loads(change.payload_json or "{}"),
        revision=change.revision,
    )


class Backoff:
    """Exponential backoff with full jitter, bounded."""

    def __init__(self, initial: float = 0.05, maximum: float = 2.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self._next = initial

    def reset(self) -> None:
        self._next = self.initial

    def delay(self) -> float:
        value = random.uniform(self.initial, self._next)
        self._next = min(self.maximum, self._next * 2)
        return value


class ReplicaFile:
    """The persisted replica: ``replica.bin`` (format in sidecar/authz/replica_file.py), written
    whole and atomically (temp file, fsync, rename), and ``replica.log`` beside it, the changes
    applied since, appended (``append``) until it outgrows an eighth of ``replica.bin``; then
    the next save is whole again and starts a new log. A ``replica.json`` of the previous
    format is read once when there is no ``replica.bin``, and removed after the first save."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / SNAPSHOT_FILE
        self.legacy = state_dir / LEGACY_SNAPSHOT_FILE
        self.log = state_dir / LOG_FILE
        self.state_dir = state_dir
        self._base = b""  # the trailer of the replica.bin this process wrote (b"": none yet)
        self._base_bytes = 0
        self._log_bytes = 0
        self.appends = 0

    def save(self, replica: Replica) -> None:
        """Write the whole replica, then an empty log that follows it (a crash in between
        leaves the old log, which names the old file and is ignored)."""
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        parts = replica.dump_parts()
        _write_atomically(self.path, parts)
        self._base, self._base_bytes = parts[-1], sum(map(len, parts))
        header = replica_file.log_header(self._base)
        _write_atomically(self.log, [header])
        self._log_bytes = len(header)
        self.legacy.unlink(missing_ok=True)

    def append(self, changes: list[Change], last_contact: float) -> bool:
        """Append ``changes`` (applied since the last save or append) to the log; False, and
        nothing written, when a whole save is due instead."""
        if not self._base or self._log_bytes > max(LOG_MIN_BYTES, self._base_bytes // 8):
            return False
        records = replica_file.log_records(self._base, changes, last_contact)
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND)
        with os.fdopen(fd, "ab") as fh:
            fh.write(records)
            fh.flush()
            os.fsync(fh.fileno())
        self._log_bytes += len(records)
        self.appends += 1
        return True

    def load(self, replica: Replica) -> bool:
        """Restore the replica, then replay the log beside it; False when there is no usable
        file (the replica is then left as it was: never partly loaded)."""
        for path in (self.path, self.legacy):
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            try:
                replica.loads(data)
            except ReplicaError as exc:
                log.warning(
                    "refusing the persisted replica; waiting for a snapshot",
                    extra={"file": str(path), "error": str(exc)},
                )
                return False
            if path == self.path:
                self._replay(replica, replica_file.base_sum(data))
            return True
        return False

    def _replay(self, replica: Replica, base: bytes) -> None:
        """Apply the log's intact records in order (a torn tail is left out, logged)."""
        try:
            data = self.log.read_bytes()
        except FileNotFoundError:
            return
        records, _, intact = replica_file.read_log(data, base)
        for change, contact in records:
            try:
                replica.apply(change)
            except ReplicaError as exc:
                log.warning("replica log: stopped at a change that does not apply",
                            extra={"revision": change.revision, "error": str(exc)})  # fmt: skip
                return
            replica.last_contact = contact
        if not intact:
            log.warning(
                "replica log: replayed up to a torn or altered record; resuming from there",
                extra={"file": str(self.log), "revision": replica.revision},
            )


def _write_atomically(path: Path, parts: list[bytes]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        for part in parts:
            fh.write(part)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def parse_targets(value: str | Sequence[str]) -> list[str]:
    """``"a:1,b:2"`` (or a list) as a list of HOST:PORT targets, in order, without repeats."""
    items = value.split(",") if isinstance(value, str) else list(value)
    targets = list(dict.fromkeys(t.strip() for t in items if t.strip()))
    if not targets:
        raise ValueError("control_plane: give at least one HOST:PORT")
    return targets


class SyncClient:
    """Keeps ``replica`` in step with one of the control-plane replicas in ``targets``."""

    def __init__(
        self,
        replica: Replica,
        targets: str | Sequence[str],
        clock: Clock,
        *,
        state_dir: Path | None = None,
        sync_token: str = "",
        sidecar_id: str = "",
        persist_interval: float = 1.0,
        silence_timeout: float = 10.0,
        credentials: grpc.ChannelCredentials | None = None,
        channel_options: Sequence[tuple[str, str]] = (),
        packed_keys: bool = True,
        channel_factory: Callable[[str], grpc.Channel] | None = None,
    ) -> None:
        self.replica = replica
        # How a channel to a target is made: in this process (the default), or through the
        # control-plane link's process (sidecar/dataplane/link.py), which the sidecar uses.
        self.channel_factory = channel_factory
        self.targets = parse_targets(targets)
        self._current = 0
        # A stream with no message (not even the 1 s heartbeat) for this long is dead even if
        # TCP says otherwise (a frozen or partitioned control plane): cancel it and move on.
        self.silence_timeout = silence_timeout
        self._last_message = time.monotonic()
        # TLS (sidecar/ops/tls.py) when the control plane serves it; plaintext otherwise.
        self.credentials = credentials
        self.channel_options = list(channel_options)
        self.clock = clock
        self.file = ReplicaFile(state_dir) if state_dir is not None else None
        self.metadata = (("authorization", f"Bearer {sync_token}"),) if sync_token else ()
        self.sidecar_id = sidecar_id or f"{os.uname().nodename}:{os.getpid()}"
        self.persist_interval = persist_interval
        self.connected = False
        self.reconnects = 0
        self._stop = threading.Event()
        self._call: grpc.Future | None = None  # type: ignore[type-arg]
        self._thread = threading.Thread(target=self._run, name="spauth-sync", daemon=True)
        self._watchdog = threading.Thread(
            target=self._watch, name="spauth-sync-watchdog", daemon=True
        )
        self._dirty = False
        self._last_save = 0.0
        self._save_every = persist_interval
        self._pending: list[Change] = []
        self._packed: list[bytes] = []  # the pieces of a packed key table, as they arrived
        self._unsaved: list[Change] = []  # applied since the last save, for the log
        self._whole = True  # the next save writes the whole replica (a snapshot, a restart)
        # Ask for the snapshot's keys as a packed table (a control plane that predates it
        # ignores the flag and sends entries).
        self.packed_keys = packed_keys
        self.packed_snapshots = 0  # snapshots that came as a packed key table

    @property
    def target(self) -> str:
        """The control plane this client streams from (or tries next)."""
        return self.targets[self._current]

    def start(self) -> None:
        if self.file is not None and self.file.load(self.replica):
            log.info("serving from persisted replica", extra={"revision": self.replica.revision})
        self._thread.start()
        self._watchdog.start()

    def stop(self) -> None:
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()
        self._thread.join(5)
        self._watchdog.join(5)
        self._save(force=True)

    def _run(self) -> None:
        backoff = Backoff()
        failed_in_a_row = 0
        while not self._stop.is_set():
            received = False
            try:
                with self._channel() as channel:
                    received = self._stream(pb_grpc.ReplicationServiceStub(channel), backoff)
            except grpc.RpcError as exc:
                if self._stop.is_set():
                    break
                code = exc.code() if hasattr(exc, "code") else None
                log.warning(
                    "replication stream lost; reconnecting",
                    extra={"target": self.target, "code": getattr(code, "name", "?")},
                )
            except ReplicaError:
                log.exception("bad change from control plane; resyncing from a snapshot")
                self.replica.revision = 0
            self._call = None
            self.connected = False
            self.reconnects += 1
            failed_in_a_row = 0 if received else failed_in_a_row + 1
            self._rotate()
            # Straight to the next replica while some are untried; back off once every one has
            # failed in a row (they are all down, or the network is).
            if failed_in_a_row >= len(self.targets) or len(self.targets) == 1:
                self._stop.wait(backoff.delay())

    def _rotate(self) -> None:
        if len(self.targets) > 1:
            self._current = (self._current + 1) % len(self.targets)
            log.info("trying the next control plane", extra={"target": self.target})

    def _watch(self) -> None:
        """Cancel a stream that has been silent for ``silence_timeout`` seconds."""
        interval = max(0.05, min(1.0, self.silence_timeout / 4))
        while not self._stop.wait(interval):
            call = self._call
            silent = time.monotonic() - self._last_message
            if call is not None and silent > self.silence_timeout:
                log.warning(
                    "replication stream silent; reconnecting",
                    extra={"target": self.target, "silent_s": round(silent, 1)},
                )
                self._call = None
                call.cancel()

    def _channel(self) -> grpc.Channel:
        if self.channel_factory is not None:
            return self.channel_factory(self.target)
        if self.credentials is not None:
            return grpc.secure_channel(self.target, self.credentials, self.channel_options)
        return grpc.insecure_channel(self.target, self.channel_options)

    def _stream(self, stub: pb_grpc.ReplicationServiceStub, backoff: Backoff) -> bool:
        """Follow one Subscribe stream until it ends; whether any message arrived."""
        after = self.replica.revision if self.replica.loaded else 0
        call = stub.Subscribe(
            pb.SubscribeRequest(
                after_revision=after,
                sidecar_id=self.sidecar_id,
                log_id=self.replica.log_id,
                packed_keys=self.packed_keys,
            ),
            metadata=self.metadata,
        )
        self._last_message = time.monotonic()
        self._call = call
        self._pending = []
        self._packed = []
        received = False
        for message in call:
            received = True
            self._last_message = time.monotonic()
            self.connected = True
            backoff.reset()
            self.replica.last_contact = self.clock.now()
            kind = message.WhichOneof("event")
            if kind == "change":
                change = from_pb(message.change)
                self.replica.apply(change)
                if self.file is not None:
                    self._unsaved.append(change)
                self._dirty = True
            elif kind == "snapshot":
                snap = message.snapshot
                self._pending.extend(from_pb(e) for e in snap.entries)
                if snap.packed_keys:
                    self._packed.append(snap.packed_keys)
                if snap.complete:
                    self._load_snapshot(snap.revision, snap.log_id)
            self._save()
        return received

    def _load_snapshot(self, revision: int, log_id: str) -> None:
        """Swap in the snapshot just completed: a packed key table when the control plane
        sent one, else (a control plane that predates it) every key as an entry."""
        chunks: list[bytes | memoryview]
        chunks, self._packed = list(self._packed), []
        pending, self._pending = self._pending, []
        packed = bool(chunks)
        if packed:
            try:  # decoded from the pieces (never joined first: one copy of the table less)
                table = PackedKeys.decode_chunks(chunks)
            except PackError as exc:
                raise ReplicaError(f"snapshot at revision {revision}: {exc}") from exc
            self.replica.load_packed(revision, table, pending, log_id)
            self.packed_snapshots += 1
        else:
            self.replica.load_snapshot(revision, pending, log_id)
        self._dirty = True
        self._whole = True
        self._unsaved = []
        log.info("snapshot loaded", extra={"revision": revision, "packed": bool(packed)})

    def _save(self, force: bool = False) -> None:
        if self.file is None or not self._dirty or not self.replica.loaded:
            return
        now = time.monotonic()
        if not force and now - self._last_save < self._save_every:
            return
        whole = self._whole
        try:
            if not whole and not self.file.append(self._unsaved, self.replica.last_contact):
                whole = True
            if whole:
                self.file.save(self.replica)
        except OSError:
            log.exception("cannot persist replica")
            self._whole = True  # a log write may have been cut short: start a new one
            return
        self._whole = False
        self._unsaved = []
        self._dirty = False
        self._last_save = now
        # A whole save of a big replica takes a while (≈ 0.5 s for 1M keys): keep those to at
        # most a tenth of the sync thread's time; appending a few changes costs little.
        elapsed = time.monotonic() - now
        self._save_every = max(self.persist_interval, 10 * elapsed if whole else 0.0)
