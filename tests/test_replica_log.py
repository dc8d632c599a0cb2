"""The replica's change log beside replica.bin (sidecar/authz/replica_file.py, ReplicaFile in
sidecar/replication/client.py): a persist appends the changes since instead of rewriting the whole
file; a restart replays them; a torn or altered record ends the replay there (the replica resumes
from the revision before it, never applies a part or what follows); a log that follows another
replica.bin is ignored whole; a log grown past an eighth of the file makes the next save whole."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from sidecar.authz.replica import Replica
from sidecar.core import changes
from sidecar.core.models import Change
from sidecar.replication import client as client_module
from sidecar.replication.client import ReplicaFile

NOW = 2_000_000_000


def digest(key_id: str) -> bytes:
    return hashlib.sha256(key_id.encode()).digest()


def upsert(key_id: str, revision: int) -> Change:
    m = changes.CredentialUpserted(key_id, digest(key_id), "acme", frozenset({"checks:read"}), NOW)
    c = m.change()
    return Change(c.kind, c.subject, c.payload, revision)


def revoke(key_id: str, revision: int) -> Change:
    c = changes.CredentialRevoked(key_id).change()
    return Change(c.kind, c.subject, c.payload, revision)


def based(tmp_path: Path) -> tuple[Replica, ReplicaFile]:
    r = Replica()
    r.load_snapshot(10, [upsert(f"key_{i}", 0) for i in range(5)], "log-a")
    f = ReplicaFile(tmp_path)
    f.save(r)
    return r, f


def follow(r: Replica, f: ReplicaFile, batches: list[list[Change]], contact: float) -> None:
    for batch in batches:
        for change in batch:
            r.apply(change)
        r.last_contact = contact
        assert f.append(batch, contact)


def test_appended_changes_replay_after_a_restart(tmp_path: Path) -> None:
    r, f = based(tmp_path)
    follow(r, f, [[revoke("key_1", 11), upsert("key_9", 12)], [revoke("key_9", 14)]], 77.0)
    restarted = Replica()
    assert ReplicaFile(tmp_path).load(restarted)
    assert (restarted.revision, restarted.log_id, restarted.last_contact) == (14, "log-a", 77.0)
    assert dict(restarted.by_digest) == dict(r.by_digest)
    assert restarted.credential(digest("key_1")).revoked  # type: ignore[union-attr]
    assert restarted.credential(digest("key_9")).revoked  # type: ignore[union-attr]


@pytest.mark.parametrize("damage", ["torn", "flipped"])
def test_a_damaged_record_ends_the_replay_there(tmp_path: Path, damage: str) -> None:
    r, f = based(tmp_path)
    follow(r, f, [[revoke("key_1", 11)], [revoke("key_2", 12)], [revoke("key_3", 13)]], 5.0)
    data = f.log.read_bytes()
    record = (len(data) - 40) // 3  # the three records have the same length
    if damage == "torn":  # the last write cut short
        f.log.write_bytes(data[:-7])
        expected = 12
    else:  # one byte of the second record altered: the third is not applied either
        at = 40 + record + record // 2
        f.log.write_bytes(data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :])
        expected = 11
    restarted = Replica()
    assert ReplicaFile(tmp_path).load(restarted)
    assert restarted.revision == expected  # resumes from here: the rest comes again
    assert restarted.credential(digest("key_1")).revoked  # type: ignore[union-attr]
    for n, revision in ((2, 12), (3, 13)):
        cred = restarted.credential(digest(f"key_{n}"))
        assert cred is not None and cred.revoked == (revision <= expected)


def test_a_log_that_follows_another_file_is_ignored(tmp_path: Path) -> None:
    r, f = based(tmp_path)
    follow(r, f, [[revoke("key_1", 11)]], 5.0)
    old_log = f.log.read_bytes()
    r.apply(upsert("key_7", 12))
    f.save(r)  # a whole save: a new file and an empty log
    f.log.write_bytes(old_log)  # as if the old log had survived the new file
    restarted = Replica()
    assert ReplicaFile(tmp_path).load(restarted)
    assert restarted.revision == 12
    assert dict(restarted.by_digest) == dict(r.by_digest)


def test_a_log_grown_past_an_eighth_of_the_file_asks_for_a_whole_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "LOG_MIN_BYTES", 0)
    r, f = based(tmp_path)
    size = f.path.stat().st_size
    revision = 10
    while f.log.stat().st_size <= size // 8:
        revision += 1
        change = upsert(f"key_{revision}", revision)
        r.apply(change)
        assert f.append([change], 1.0)
    assert not f.append([], 1.0)  # the caller saves whole instead
    f.save(r)
    assert f.log.stat().st_size == 40 and f.append([], 1.0)
    restarted = Replica()
    assert ReplicaFile(tmp_path).load(restarted)
    assert dict(restarted.by_digest) == dict(r.by_digest)


def test_a_new_process_saves_whole_before_it_appends(tmp_path: Path) -> None:
    based(tmp_path)
    fresh = ReplicaFile(tmp_path)
    assert not fresh.append([revoke("key_1", 11)], 1.0)
    assert fresh.log.stat().st_mode & 0o777 == 0o600
