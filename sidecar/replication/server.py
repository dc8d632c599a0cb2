"""ReplicationService: a snapshot, then every change in revision order, then heartbeats. Changes
are pushed as soon as the store commits them (in-process notification) and re-read from the
change log at least every heartbeat, so a missed notification only delays, never loses."""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

import grpc

from sidecar._gen.statuspulse.auth.v1 import replication_pb2 as pb
from sidecar._gen.statuspulse.auth.v1 import replication_pb2_grpc as pb_grpc
from sidecar.core import changes
from sidecar.core.apikeys import key_entries
from sidecar.core.clock import Clock
from sidecar.core.errors import Unavailable
from sidecar.core.models import Change
from sidecar.core.packed import AS_ROW, PackedKeys, PackError
from sidecar.core.storage import KeyRow, Store, UnitOfWork
from sidecar.replication.snapshot_file import anchor_of
from sidecar.replication.snapshots import PackedSnapshots, SnapshotRead, entry_at

log = logging.getLogger("sidecar.replication")

SnapshotSource = Callable[[UnitOfWork, int], Iterable[Change]]
KeySource = Callable[[UnitOfWork, int], Iterable[KeyRow]]
PackedKeySource = Callable[[UnitOfWork, int], PackedKeys]
CHUNK = 5000
PACKED_CHUNK = 1 << 20  # bytes of the packed key table per message (gRPC's limit is 4 MiB)
BATCH = 1000
UPSERTED = changes.ChangeKind.CREDENTIAL_UPSERTED.value


def to_pb(change: Change) -> pb.ReplicaChange:
    return pb.ReplicaChange(
        revision=change.revision,
        kind=change.kind,
        subject=change.subject,
        payload_json=json.dumps(change.payload, sort_keys=True),
    )


class ReplicationServicer(pb_grpc.ReplicationServiceServicer):  # type: ignore[misc]
    """Streams the change log to sidecars."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        sources: list[SnapshotSource],
        *,
        key_source: KeySource | None = None,
        packed_key_source: PackedKeySource | None = None,
        heartbeat: float = 1.0,
        sync_token: str = "",
        snapshot_file: Path | None = None,
    ) -> None:
        self._store = store
        self._clock = clock
        # ``key_source`` gives the API keys as rows (packed without a JSON round trip);
        # ``sources`` give every other entry (and the keys too when there is no key_source).
        self._sources = sources
        self._key_source = key_source
        self._heartbeat = heartbeat
        self._token = sync_token.encode()
        self.subscribers = 0
        self.snapshots_sent = 0
        self._wakers: set[Callable[[int], None]] = set()
        self._log_id = ""  # read once: fixed for the life of the store
        # The packed snapshot, built once and shared by the sidecars of a rollout, kept on
        # disk at ``snapshot_file`` for the next start (None: in memory only). Its keys are
        # packed by ``packed_key_source`` straight from the store when given (the lean read of
        # sidecar/replication/packing.py), else from ``key_source``'s rows.
        read: SnapshotRead = self._read_snapshot
        if packed_key_source is not None:
            read = functools.partial(self._read_packed_snapshot, packed_key_source)
        self.snapshots = PackedSnapshots(store, clock, read, self.log_id, snapshot_file)

    def wake(self, revision: int) -> None:
        """Have every open stream re-read the change log now: another control-plane replica
        committed ``revision`` (told by the change bus, sidecar/bus/)."""
        for waker in list(self._wakers):
            waker(revision)

    def snapshot(self) -> tuple[int, list[Change]]:
        """The head revision and every entry, read in one consistent transaction."""
        head, _, keys, entries = self._read_snapshot()
        return head, key_entries(keys) + entries

    def packed_snapshot(self) -> tuple[int, bytes, list[Change]]:
        """The head revision, the API keys as one packed key table and every other entry;
        the table is empty (b"") when a key cannot be packed, and the keys then go as entries."""
        head, _, keys, entries = self._read_snapshot()
        try:
            return head, PackedKeys.pack_rows(keys).encode(), entries
        except PackError as exc:
            log.warning("snapshot: keys sent as entries", extra={"error": str(exc)})
            return head, b"", key_entries(keys) + entries

    def prepare(self) -> None:
        """Have the packed snapshot at hand before the control plane reports ready (see
        ``PackedSnapshots.prepare``)."""
        self.snapshots.prepare()

    def refresh(self) -> bool:
        """Build the packed snapshot again in the background when it is due."""
        return self.snapshots.refresh()

    @property
    def ready(self) -> bool:
        return self.snapshots.ready

    @ready.setter
    def ready(self, value: bool) -> None:
        self.snapshots.ready = value

    @property
    def packed_builds(self) -> int:
        return self.snapshots.builds

    @property
    def snapshots_from_file(self) -> int:
        return self.snapshots.from_file

    def shared_packed_snapshot(self) -> tuple[int, bytes, list[Change]]:
        """``packed_snapshot`` reused while it is recent (REUSE_CHANGES, REUSE_SECONDS), with
        the changes since it appended to its entries."""
        snap = self.snapshots.current()
        if snap is None:
            revision, packed, entries = self.packed_snapshot()
            return revision, packed, entries
        revision, entries = snap.revision, list(snap.entries)
        while True:
            _, later = self._changes(revision)
            if not later:
                break
            entries = entries + later
            revision = later[-1].revision
        return revision, snap.packed, entries

    def _read_snapshot(self) -> tuple[int, str, list[KeyRow], list[Change]]:
        now = int(self._clock.now())
        with self._store.read() as uow:
            head = uow.changes.head()
            anchor = anchor_of(entry_at(uow, head))
            keys = list(self._key_source(uow, now)) if self._key_source is not None else []
            entries = [entry for source in self._sources for entry in source(uow, now)]
        others = [entry for entry in entries if _key(entry) is None]
        if len(others) < len(entries):  # keys among the sources' entries (no key_source)
            keys.extend(AS_ROW(m) for m in map(_key, entries) if m is not None)
            entries = others
        return head, anchor, keys, entries

    def _read_packed_snapshot(
        self, pack: PackedKeySource
    ) -> tuple[int, str, list[KeyRow] | PackedKeys, list[Change]]:
        """As ``_read_snapshot``, the keys packed by ``pack`` in the same transaction
        (PackError when one cannot be packed)."""
        now = int(self._clock.now())
        with self._store.read() as uow:
            head = uow.changes.head()
            anchor = anchor_of(entry_at(uow, head))
            table = pack(uow, now)
            entries = [entry for source in self._sources for entry in source(uow, now)]
        if any(_key(entry) is not None for entry in entries):  # keys among the sources' entries
            return self._read_snapshot()
        return head, anchor, table, entries

    def log_id(self) -> str:
        """The change log's identity (sidecars resume only within the same log)."""
        if not self._log_id:
            with self._store.read() as uow:
                self._log_id = uow.changes.log_id()
        return self._log_id

    def _changes(self, after: int) -> tuple[int, list[Change]]:
        with self._store.read() as uow:
            return uow.changes.head(), uow.changes.since(after, BATCH)

    def _authorized(self, context: grpc.aio.ServicerContext[object, object]) -> bool:
        """The sync token, compared in constant time; never anonymous (a servicer without a
        token refuses everyone: key ids, scopes and expiry of every tenant are on this stream)."""
        if not self._token:
            return False
        for name, value in context.invocation_metadata() or ():
            if name == "authorization" and isinstance(value, str):
                presented = value.partition(" ")[2].strip().encode()
                return hmac.compare_digest(presented, self._token)
        return False

    async def Subscribe(
        self, request: pb.SubscribeRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[pb.SubscribeResponse]:
        if not self._authorized(context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "sync token required")
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()

        def notify(_revision: int) -> None:
            loop.call_soon_threadsafe(wake.set)

        try:
            unsubscribe = self._store.subscribe(notify)
        except Unavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, exc.message)
        self._wakers.add(notify)
        self.subscribers += 1
        try:
            after = request.after_revision
            head, _ = await asyncio.to_thread(self._changes, after)
            log_id = await asyncio.to_thread(self.log_id)
            # A sidecar with nothing yet, ahead of the log (store reset) or whose revision
            # counts in another log (a different or re-created database) gets a snapshot.
            if after <= 0 or after > head or request.log_id != log_id:
                packed = b""
                if request.packed_keys:
                    revision, packed, entries = await asyncio.to_thread(self.shared_packed_snapshot)
                else:
                    revision, entries = await asyncio.to_thread(self.snapshot)
                for response in _snapshot_chunks(revision, entries, log_id, packed):
                    yield response
                after = revision
                self.snapshots_sent += 1
                log.info(
                    "snapshot sent",
                    extra={"sidecar": request.sidecar_id, "revision": revision, "n": len(entries)},
                )
            while True:
                wake.clear()
                head, changes = await asyncio.to_thread(self._changes, after)
                for change in changes:
                    yield pb.SubscribeResponse(change=to_pb(change))
                    after = change.revision
                if len(changes) == BATCH:
                    continue
                try:
                    await asyncio.wait_for(wake.wait(), self._heartbeat)
                except TimeoutError:
                    yield pb.SubscribeResponse(heartbeat=pb.Heartbeat(head_revision=head))
        except Unavailable as exc:
            # The store is down: a retryable condition the sidecar waits out (it keeps its
            # replica), not an internal fault with a traceback.
            log.warning("subscribe: store unavailable", extra={"error": exc.message})
            await context.abort(grpc.StatusCode.UNAVAILABLE, exc.message)
        finally:
            self.subscribers -= 1
            self._wakers.discard(notify)
            unsubscribe()


def _key(entry: Change) -> changes.CredentialUpserted | None:
    """The key ``entry`` upserts; None for another kind (or one that does not parse, which
    goes as an entry for the sidecar to judge, as before)."""
    if entry.kind != UPSERTED:
        return None
    try:
        message = changes.parse(entry)
    except changes.ChangeError:
        return None
    return message if isinstance(message, changes.CredentialUpserted) else None


def _snapshot_chunks(
    revision: int, entries: list[Change], log_id: str, packed: bytes = b""
) -> Iterable[pb.SubscribeResponse]:
    """The snapshot in messages of at most CHUNK entries and PACKED_CHUNK bytes of the packed
    key table; the last one says ``complete``."""
    count = max(-(-len(entries) // CHUNK), -(-len(packed) // PACKED_CHUNK), 1)
    for i in range(count):
        yield pb.SubscribeResponse(
            snapshot=pb.Snapshot(
                revision=revision,
                entries=[to_pb(c) for c in entries[i * CHUNK : (i + 1) * CHUNK]],
                complete=i == count - 1,
                log_id=log_id,
                packed_keys=packed[i * PACKED_CHUNK : (i + 1) * PACKED_CHUNK],
            )
        )
