"""Snapshots with a packed key table over real gRPC (127.0.0.1:0, a real SQLite store), and every
mix of versions during a rolling upgrade: a new sidecar against a new control plane gets the
packed table; an old sidecar (no ``packed_keys`` in its request) gets entries; a new sidecar
against an old control plane (which ignores the field) gets entries and applies them. Each ends
with the same replica, and follows later changes."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from sidecar._gen.statuspulse.auth.v1 import replication_pb2 as pb
from sidecar._gen.statuspulse.auth.v1 import replication_pb2_grpc as pb_grpc
from sidecar.authz.replica import Replica
from sidecar.core import changes
from sidecar.core.apikeys import key_entries, key_rows
from sidecar.core.changes import oauth_snapshot
from sidecar.core.clock import FakeClock
from sidecar.core.models import ApiKey
from sidecar.core.oauth_models import RevokedToken
from sidecar.core.packed import PackedKeys
from sidecar.replication import server as server_module
from sidecar.replication import snapshots as snapshots_module
from sidecar.replication.client import ReplicaFile, SyncClient
from sidecar.replication.server import ReplicationServicer
from sidecar.store.sql.sqlite import SqliteStore
from tests.conftest import LoopThread, wait_until
from tests.support.dict_replica import DictReplica

TOKEN = "packed-test-sync-token"
KEYS = 1200  # more than one 1 MiB chunk when the chunk is made small below


class OldControlPlane(ReplicationServicer):
    """A control plane from before ``packed_keys``: proto3 drops the field it does not know,
    which is what clearing it here does; everything else is the same code."""

    async def Subscribe(
        self, request: pb.SubscribeRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[pb.SubscribeResponse]:
        request.ClearField("packed_keys")
        async for response in super().Subscribe(request, context):
            yield response


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "cp.db")
    with s.transaction() as uow:
        for i in range(KEYS):
            key_id = f"key_{i:06d}"
            uow.keys.insert(
                ApiKey(key_id, hashlib.sha256(key_id.encode()).digest(), "abcd", "n",
                       f"ws{i % 7}", frozenset({"checks:read"}), 1, 2_000_000_000, "test",
                       suspended_at=5 if i % 11 == 0 else None,
                       client_cidrs=["10.0.0.0/8"] if i % 13 == 0 else [])
            )  # fmt: skip
        uow.oauth.revoked_tokens.insert(RevokedToken("jti_1", "grt_1", 2_000_000_000, 1))
        uow.changes.append(changes.TokenRevoked("jti_1", 2e9).change())
    yield s
    s.close()


def serve(store: SqliteStore, loop: LoopThread, old: bool) -> tuple[grpc.aio.Server, str]:
    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        kind = OldControlPlane if old else ReplicationServicer
        servicer = kind(
            store, FakeClock(1000.0), [oauth_snapshot], key_source=key_rows, sync_token=TOKEN
        )
        pb_grpc.add_ReplicationServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = loop.run(start())  # type: ignore[misc]
    return server, f"127.0.0.1:{port}"


def expected(store: SqliteStore) -> DictReplica:
    ref = DictReplica()
    with store.read() as uow:
        entries = key_entries(key_rows(uow, 1000)) + oauth_snapshot(uow, 1000)
        ref.load_snapshot(uow.changes.head(), entries)
    return ref


@pytest.mark.parametrize(
    ("new_sidecar", "new_control_plane"),
    [(True, True), (False, True), (True, False)],
    ids=["new-new", "old-sidecar", "old-control-plane"],
)
def test_every_version_mix_ends_with_the_same_replica(
    store: SqliteStore,
    loop_thread: LoopThread,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    new_sidecar: bool,
    new_control_plane: bool,
) -> None:
    monkeypatch.setattr(server_module, "PACKED_CHUNK", 4096)  # the table spans many messages
    server, address = serve(store, loop_thread, old=not new_control_plane)
    replica = Replica()
    client = SyncClient(
        replica, address, FakeClock(1000.0), sync_token=TOKEN, packed_keys=new_sidecar,
        state_dir=tmp_path / "sc",
    )  # fmt: skip
    try:
        client.start()
        wait_until(lambda: replica.loaded)
        ref = expected(store)
        assert dict(replica.by_digest) == ref.by_digest
        assert replica.revoked_jtis == ref.revoked_jtis == {"jti_1": 2e9}
        assert len(replica.table) == KEYS  # entries or a packed table: both end dense
        packed_used = client.packed_snapshots == 1
        assert packed_used == (new_sidecar and new_control_plane)
        # A second sidecar in the same rollout ends with the same replica.
        second = Replica()
        other = SyncClient(
            second, address, FakeClock(1000.0), sync_token=TOKEN, packed_keys=new_sidecar
        )
        other.start()
        wait_until(lambda: second.loaded)
        other.stop()
        assert dict(second.by_digest) == dict(replica.by_digest)
        # A change after the snapshot: a revocation reaches the replica.
        with store.transaction() as uow:
            uow.changes.append(changes.CredentialRevoked("key_000003").change())
        wait_until(lambda: replica.credential(hashlib.sha256(b"key_000003").digest()).revoked)  # type: ignore[union-attr]
        client.stop()
        assert client.file is not None and client.file.appends >= 1  # the change: appended
        restarted = Replica()
        assert ReplicaFile(tmp_path / "sc").load(restarted)
        assert dict(restarted.by_digest) == dict(replica.by_digest)
    finally:
        client.stop()
        loop_thread.run(server.stop(0))


def test_a_snapshot_built_once_serves_later_sidecars_with_the_changes_since_inside(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rollout: the second sidecar gets the first one's packed table (one build), and a key
    revoked in between is already revoked when that snapshot is swapped in — never usable
    again, not even until the stream catches up."""
    clock = FakeClock(1000.0)
    servicer = ReplicationServicer(store, clock, [oauth_snapshot], key_source=key_rows)
    first_revision, _, _ = servicer.shared_packed_snapshot()
    with store.transaction() as uow:
        uow.changes.append(changes.CredentialRevoked("key_000005").change())
    revision, packed, entries = servicer.shared_packed_snapshot()
    assert servicer.packed_builds == 1
    assert revision == first_revision + 1
    replica = Replica()
    replica.load_packed(revision, PackedKeys.decode(packed), entries)
    assert replica.credential(hashlib.sha256(b"key_000005").digest()).revoked  # type: ignore[union-attr]
    assert replica.revision == revision
    # Past its age bound the table is still served (with the changes since inside) and built
    # again in the background; past the change bound it is built again before it is served.
    clock.advance(snapshots_module.REUSE_SECONDS + 1)
    assert servicer.shared_packed_snapshot()[0] == revision
    wait_until(lambda: servicer.packed_builds == 2 and not servicer.snapshots.refreshing)
    with store.transaction() as uow:
        uow.changes.append(changes.CredentialRevoked("key_000006").change())
    monkeypatch.setattr(snapshots_module, "REUSE_CHANGES", 0)
    _, _, entries = servicer.shared_packed_snapshot()
    # Built now: no change-log entry appended (the OAuth state's entries carry no revision).
    assert servicer.packed_builds == 3 and all(e.revision == 0 for e in entries)
    assert servicer.refresh() is False  # nothing since
