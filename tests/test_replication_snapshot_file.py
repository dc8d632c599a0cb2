"""The control plane's packed snapshot on disk (sidecar/replication/snapshot_file.py), on SQLite and
on a real PostgreSQL: a restarted control plane serves the kept snapshot without reading the keys
again, with the changes since inside it (a key revoked in between is revoked before the sidecar
swaps the snapshot in, over real gRPC); and a damaged, foreign, restored-and-diverged, forged or
too old file is rebuilt from the store, never served. The control plane reports ready only once
its snapshot is at hand."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import struct
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from sidecar._gen.statuspulse.auth.v1 import replication_pb2_grpc as pb_grpc
from sidecar.authz.replica import Replica
from sidecar.controlplane import ControlPlane
from sidecar.core import changes
from sidecar.core.apikeys import ApiKeyService, key_rows
from sidecar.core.changes import oauth_snapshot
from sidecar.core.clock import FakeClock
from sidecar.core.models import Minted, Principal, RequestContext
from sidecar.core.packed import PackedKeys
from sidecar.core.storage import Store
from sidecar.ops.health import Status
from sidecar.replication import snapshot_file
from sidecar.replication import snapshots as snapshots_module
from sidecar.replication.client import SyncClient
from sidecar.replication.server import ReplicationServicer
from sidecar.replication.snapshot_file import FILE_NAME, SnapshotFile
from sidecar.store.sql.sqlite import SqliteStore
from tests.conftest import LoopThread, wait_until
from tests.support.sync import TEST_SYNC_TOKEN

OPERATOR = RequestContext(Principal("key_op", "*", frozenset({"admin:full"})), "req-test")
KEYS = 40


@pytest.fixture
def minted(store: Store, clock: FakeClock) -> list[Minted]:
    service = ApiKeyService(store, clock)
    return [
        service.create(OPERATOR, workspace=f"ws{i % 3}", name=f"k{i}", scopes=["checks:read"])
        for i in range(KEYS)
    ]


def servicer(store: Store, clock: FakeClock, path: Path) -> ReplicationServicer:
    return ReplicationServicer(
        store, clock, [oauth_snapshot], key_source=key_rows, snapshot_file=path,
        sync_token=TEST_SYNC_TOKEN,
    )  # fmt: skip


def digest_of(m: Minted) -> bytes:
    return hashlib.sha256(m.secret.encode()).digest()


def served(s: ReplicationServicer) -> Replica:
    revision, packed, entries = s.shared_packed_snapshot()
    replica = Replica()
    replica.load_packed(revision, PackedKeys.decode(packed), entries)
    return replica


def usable(store: Store, clock: FakeClock) -> set[bytes]:
    with store.read() as uow:
        return {row[1] for row in key_rows(uow, int(clock.now()))}


def test_a_restarted_control_plane_serves_the_kept_snapshot_with_a_revocation_since_inside(
    store: Store, clock: FakeClock, minted: list[Minted], tmp_path: Path, loop_thread: LoopThread
) -> None:
    path = tmp_path / FILE_NAME
    first = servicer(store, clock, path)
    first.prepare()
    assert (first.packed_builds, first.snapshots_from_file, first.ready) == (1, 0, True)
    assert path.stat().st_mode & 0o777 == 0o600
    victim = minted[7]
    ApiKeyService(store, clock).revoke(OPERATOR, victim.key.id)
    # The next control plane (a restart, or another replica on the same database) reads the
    # file instead of the store's keys, and serves it with the revocation inside.
    second = servicer(store, clock, path)
    second.prepare()
    assert (second.packed_builds, second.snapshots_from_file) == (0, 1)

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        pb_grpc.add_ReplicationServiceServicer_to_server(second, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = loop_thread.run(start())  # type: ignore[misc]
    replica = Replica()
    client = SyncClient(replica, f"127.0.0.1:{port}", clock, sync_token=TEST_SYNC_TOKEN)
    # Checked on every revision the replica passes: the key is never usable once loaded.
    seen: list[bool] = []
    install = replica._install

    def watched(*args: object) -> None:
        install(*args)  # type: ignore[arg-type]
        cred = replica.credential(digest_of(victim))
        seen.append(cred is not None and not cred.revoked)

    replica._install = watched  # type: ignore[method-assign]
    client.start()
    try:
        wait_until(lambda: client.packed_snapshots == 1 and replica.loaded)
    finally:
        client.stop()
        loop_thread.run(server.stop(0))
    assert seen == [False]
    assert second.packed_builds == 0  # served from the file
    assert replica.credential(digest_of(victim)).revoked  # type: ignore[union-attr]
    assert set(replica.by_digest) - {digest_of(victim)} == usable(store, clock)


def damaged(data: bytes) -> list[bytes]:
    return [
        data[: len(data) // 2],
        data[:-1],
        data[:40] + bytes([data[40] ^ 1]) + data[41:],
        data[:-40] + bytes([data[-40] ^ 1]) + data[-39:],
        b"",
        b"SPSNAPSH" + b"\0" * 60,
    ]


def test_a_damaged_file_is_rebuilt_from_the_store_never_served(
    store: Store, clock: FakeClock, minted: list[Minted], tmp_path: Path
) -> None:
    path = tmp_path / FILE_NAME
    servicer(store, clock, path).prepare()
    good = path.read_bytes()
    ApiKeyService(store, clock).revoke(OPERATOR, minted[3].key.id)
    for case in damaged(good):
        with pytest.raises(snapshot_file.SnapshotFileError):
            snapshot_file.decode(case)
        path.write_bytes(case)
        s = servicer(store, clock, path)
        s.prepare()
        assert (s.packed_builds, s.snapshots_from_file) == (1, 0)
        assert snapshot_file.decode(path.read_bytes()).revision == s.shared_packed_snapshot()[0]
        replica = served(s)
        assert set(replica.by_digest) == usable(store, clock)
        assert digest_of(minted[3]) not in usable(store, clock)


def forged(path: Path, **fields: object) -> None:
    """The file as another (or a diverged) database would have left it: whole and checksummed,
    but about another change log."""
    snap = snapshot_file.decode(path.read_bytes())
    path.write_bytes(snapshot_file.encode(replace(snap, **fields)))  # type: ignore[arg-type]


@pytest.mark.parametrize("stale", ["another-log", "ahead", "diverged", "too-far-behind"])
def test_a_stale_file_is_rebuilt_from_the_store_never_served(
    store: Store,
    clock: FakeClock,
    minted: list[Minted],
    tmp_path: Path,
    stale: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = tmp_path / FILE_NAME
    servicer(store, clock, path).prepare()
    snap = snapshot_file.decode(path.read_bytes())
    ApiKeyService(store, clock).revoke(OPERATOR, minted[5].key.id)
    if stale == "another-log":
        forged(path, log_id="another-database")
    elif stale == "ahead":
        forged(path, revision=snap.revision + 5)
    elif stale == "diverged":  # same revision number, another entry at it
        forged(path, anchor=snapshot_file.anchor_of(changes.CredentialRevoked("x").change()))
    else:
        monkeypatch.setattr(snapshots_module, "REUSE_CHANGES", 0)
    s = servicer(store, clock, path)
    s.prepare()
    assert (s.packed_builds, s.snapshots_from_file) == (1, 0)
    rebuilt = snapshot_file.decode(path.read_bytes())
    assert rebuilt.revision > snap.revision
    replica = served(s)
    assert set(replica.by_digest) == usable(store, clock)


def test_a_database_restored_from_a_backup_and_written_since_does_not_match_the_file(
    tmp_path: Path, clock: FakeClock
) -> None:
    """A restored SQLite file keeps its change log's id and reuses revision numbers: the file
    built after the changes the backup lost names a revision the restored log has too, with
    another entry at it (its anchor), so the snapshot is rebuilt."""
    db = tmp_path / "spauth.db"
    store = SqliteStore(db)
    service = ApiKeyService(store, clock)
    kept = [
        service.create(OPERATOR, workspace="acme", name=f"k{i}", scopes=["checks:read"])
        for i in range(3)
    ]
    store.close()
    shutil.copy(db, tmp_path / "backup.db")
    store = SqliteStore(db)
    lost = ApiKeyService(store, clock).create(
        OPERATOR, workspace="acme", name="lost", scopes=["checks:read"]
    )
    path = tmp_path / FILE_NAME
    servicer(store, clock, path).prepare()
    store.close()
    shutil.copy(tmp_path / "backup.db", db)
    store = SqliteStore(db)
    ApiKeyService(store, clock).revoke(OPERATOR, kept[0].key.id)  # the lost key's revision
    s = servicer(store, clock, path)
    s.prepare()
    assert (s.packed_builds, s.snapshots_from_file) == (1, 0)
    replica = served(s)
    assert replica.credential(digest_of(lost)) is None
    assert replica.credential(digest_of(kept[0])) is None
    assert replica.credential(digest_of(kept[1])) is not None
    store.close()


def test_a_control_plane_is_ready_only_with_its_snapshot_at_hand(
    tmp_path: Path, clock: FakeClock
) -> None:
    from sidecar.config import load_settings

    settings = load_settings(
        {"data_dir": str(tmp_path), "admin_addr": "127.0.0.1:0", "http_addr": "127.0.0.1:0",
         "sync_token": TEST_SYNC_TOKEN},
        environ={},
    )  # fmt: skip

    async def run() -> None:
        plane = ControlPlane(settings, clock=clock)
        plane.bootstrap()
        await plane.start()
        try:
            assert plane.replication.ready and (tmp_path / FILE_NAME).exists()
            assert (await plane.readiness()).status is Status.SERVING
            plane.replication.ready = False  # as while ``prepare`` runs
            health = await plane.readiness()
            assert health.status is Status.NOT_SERVING and health.reasons == ("starting",)
            plane.replication.ready = True
            assert plane.replication.packed_builds == 1
        finally:
            await plane.aclose(grace=0)
        again = ControlPlane(settings, clock=clock)
        await again.start()
        try:
            assert again.replication.snapshots_from_file == 1
            assert again.replication.packed_builds == 0
        finally:
            await again.aclose(grace=0)

    asyncio.run(run())


def test_a_subscribe_before_prepare_takes_the_file_too_and_nothing_is_built_twice(
    store: Store, clock: FakeClock, minted: list[Minted], tmp_path: Path
) -> None:
    path = tmp_path / FILE_NAME
    servicer(store, clock, path).prepare()
    s = servicer(store, clock, path)
    assert set(served(s).by_digest) == usable(store, clock)  # a sidecar's Subscribe, first
    s.prepare()
    assert (s.packed_builds, s.snapshots_from_file, s.ready) == (0, 1, True)


def test_an_old_snapshot_is_refreshed_in_the_background_and_kept_on_disk(
    store: Store, clock: FakeClock, minted: list[Minted], tmp_path: Path
) -> None:
    path = tmp_path / FILE_NAME
    s = servicer(store, clock, path)
    s.prepare()
    assert s.refresh() is False  # nothing since
    ApiKeyService(store, clock).revoke(OPERATOR, minted[2].key.id)
    assert s.refresh() is False  # one change since, and young
    clock.advance(snapshots_module.REUSE_SECONDS + 1)
    assert s.refresh() is True and s.packed_builds == 2
    snap = snapshot_file.decode(path.read_bytes())
    with store.read() as uow:
        assert snap.revision == uow.changes.head()
    assert set(served(s).by_digest) == usable(store, clock)


def test_an_unwritable_directory_leaves_the_snapshot_in_memory(
    store: Store, clock: FakeClock, minted: list[Minted], tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    s = servicer(store, clock, blocker / FILE_NAME)
    s.prepare()
    assert s.ready and s.packed_builds == 1
    assert set(served(s).by_digest) == usable(store, clock)
    assert s.packed_builds == 1


def test_the_file_round_trips(tmp_path: Path) -> None:
    snap = snapshot_file.PackedSnapshot(
        "log", 9, "ab" * 32, b"\x01\x02", (changes.TokenRevoked("jti", 5.0).change(),)
    )
    f = SnapshotFile(tmp_path / "x" / FILE_NAME)
    f.save(snap)
    assert f.load() == snap
    assert SnapshotFile(tmp_path / "missing").load() is None


def test_the_file_is_written_in_its_documented_layout(tmp_path: Path) -> None:
    """Written piece by piece, the file is still the documented bytes: magic, version, header
    length, JSON header, table length, table, SHA-256 of all before it."""
    snap = snapshot_file.PackedSnapshot("log", 9, "ab" * 32, b"\x00table\xff" * 3, ())
    f = SnapshotFile(tmp_path / FILE_NAME)
    f.save(snap)
    header = b'{"log_id":"log","revision":9,"anchor":"' + b"ab" * 32 + b'","entries":[]}'
    body = b"SPSNAPSH" + struct.pack("<II", 1, len(header)) + header
    body += struct.pack("<Q", len(snap.packed)) + snap.packed
    assert f.path.read_bytes() == body + hashlib.sha256(body).digest()
