"""The dense replica (a packed key table, shared profiles, an overlay of later changes) answers
exactly what the dict replica it replaced answered (tests/support/dict_replica.py, kept as the
reference), for random snapshots and change sequences with folds (racing with the changes applied
while they build), prunes and restarts from the replica file in between; no digest ever resolves to
another workspace's identity; and the packed table is used whole or not at all."""

from __future__ import annotations

import hashlib
import json
import random
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sidecar.authz.replica as replica_module
from sidecar.authz.replica import Credential, FoldJob, Replica, ReplicaError
from sidecar.core import changes
from sidecar.core.models import Change
from sidecar.core.packed import PackedKeys, PackError
from sidecar.replication.client import ReplicaFile
from tests.support.dict_replica import DictReplica

IDS = [f"key_{c}" for c in "abcdef"] + ["key_gg", "key_hhh"]  # ids of three widths
WORKSPACES = ["acme", "globex"]
SCOPES = ["checks:read", "checks:write", "admin:full"]
NOW = 2_000_000_000


def digest(key_id: str, version: int) -> bytes:
    """One digest per (key id, version): a replacement gets a new one, never another key's."""
    return hashlib.sha256(f"{key_id}/{version}".encode()).digest()


def at(change: Change, revision: int) -> Change:
    return Change(change.kind, change.subject, change.payload, revision)


ALL_DIGESTS = [digest(i, v) for i in IDS for v in range(3)]

upserts = st.builds(
    lambda key_id, version, ws, scopes, expires, grace, suspended, cidrs, rate: (
        changes.CredentialUpserted(
            key_id,
            digest(key_id, version),
            ws,
            frozenset(scopes),
            expires,
            rate_limit=rate,
            rate_period=60 if rate else 0,
            grace_deadline=grace,
            suspended=suspended,
            client_cidrs=cidrs,
        ).change()
    ),
    st.sampled_from(IDS),
    st.integers(0, 2),
    st.sampled_from(WORKSPACES),
    st.sets(st.sampled_from(SCOPES), max_size=2),
    st.sampled_from([NOW - 200_000, NOW - 10, NOW + 3600]),
    st.sampled_from([None, NOW - 100_000, NOW + 60]),
    st.booleans(),
    st.sampled_from([(), ("10.0.0.0/8",), ("10.0.0.0/8", "2001:db8::/32")]),
    st.sampled_from([0, 100]),
)
others = st.one_of(
    st.builds(lambda i: changes.CredentialRevoked(i).change(), st.sampled_from(IDS)),
    st.builds(lambda i: changes.CredentialExpired(i).change(), st.sampled_from(IDS)),
    st.builds(lambda g: changes.GrantRevoked(g, NOW - 200_000).change(), st.sampled_from("gh")),
)
steps = st.one_of(
    upserts,
    others,
    st.just("prune"),
    st.just("fold"),
    st.just("build"),
    st.just("install"),
    st.just("restart"),
    st.just("persist"),
    st.just("reload"),
)


class SteppedFolds:
    """A fold runner the test drives: a fold begins (its copy of the overlay taken), then the
    test applies more changes, builds the new table, applies more, and installs it; the same
    interleavings a fold thread has with the sync thread, chosen by hypothesis."""

    def __init__(self) -> None:
        self.jobs: list[FoldJob] = []
        self.built: list[FoldJob] = []

    def __call__(self, job: FoldJob) -> None:
        self.jobs.append(job)

    def build(self) -> None:
        for job in self.jobs:
            job.build()
        self.built += self.jobs
        self.jobs = []

    def install(self) -> None:
        self.build()
        built, self.built = self.built, []
        for job in built:
            job.install()


def inline(job: FoldJob) -> None:
    job()


@contextmanager
def compact_after(entries: int) -> Iterator[None]:
    """Fold the overlay into the table after ``entries`` overlay entries (the production
    threshold is thousands; the sequences here are short)."""
    saved = replica_module.COMPACT_MIN
    replica_module.COMPACT_MIN = entries
    try:
        yield
    finally:
        replica_module.COMPACT_MIN = saved


def assert_same(dense: Replica, ref: DictReplica) -> None:
    for d in ALL_DIGESTS:
        assert dense.credential(d) == ref.by_digest.get(d), d.hex()[:8]
    assert dict(dense.by_digest) == ref.by_digest
    assert len(dense.by_digest) == len(ref.by_digest)
    assert dense.revoked_grants == ref.revoked_grants
    dense.table.packed.check()  # a table folded from an overlay keeps every invariant


@settings(max_examples=150, deadline=None)
@given(
    snapshot=st.lists(st.one_of(upserts, others), max_size=12),
    sequence=st.lists(steps, max_size=30),
    threshold=st.integers(1, 6),
)
def test_the_dense_replica_answers_what_the_dict_replica_answered(
    snapshot: list[Change], sequence: list[object], threshold: int
) -> None:
    with compact_after(threshold), tempfile.TemporaryDirectory() as state:
        folds = SteppedFolds()
        dense, ref = Replica(folds), DictReplica()
        dense.load_snapshot(5, snapshot, "log")
        ref.load_snapshot(5, snapshot, "log")
        assert_same(dense, ref)
        revision = 5
        files, unsaved = ReplicaFile(Path(state)), list[Change]()
        for step in sequence:
            if step == "persist":  # as the sync client: the changes since appended, or whole
                if not files.append(unsaved, 0.0):
                    files.save(dense)
                unsaved = []
            elif step == "reload":  # a new process: file + log
                if not files.path.exists():
                    continue
                folds = SteppedFolds()
                restored = Replica(folds)
                assert ReplicaFile(Path(state)).load(restored)
                for change in unsaved:  # not persisted: the control plane sends them again
                    restored.apply(change)
                # Prunes are not changes: what they forgot comes back, and goes again.
                restored.prune(NOW)
                ref.prune(NOW)
                dense, files = restored, ReplicaFile(Path(state))  # unsaved: still unsaved
            elif step == "prune":
                assert dense.prune(NOW) == ref.prune(NOW)
            elif step == "fold":
                dense.fold()
            elif step == "build":
                folds.build()
            elif step == "install":
                folds.install()
            elif step == "restart":
                folds = SteppedFolds()
                restored = Replica(folds)
                restored.loads(dense.dumps())
                assert (restored.revision, restored.log_id) == (dense.revision, "log")
                dense = restored
            else:
                assert isinstance(step, Change)
                revision += 1
                change = at(step, revision)
                dense.apply(change)
                ref.apply(change)
                unsaved.append(change)
            assert_same(dense, ref)
            # Lookups go through the cache too: asking twice answers the same.
            for d in ALL_DIGESTS:
                assert dense.credential(d) == ref.by_digest.get(d)


def test_a_change_drops_only_its_own_keys_from_the_lookup_cache() -> None:
    """The keys in use stay cached through changes to other keys (a revocation anywhere in the
    fleet used to make every key in use rebuild its credential); the changed key's entry goes,
    so it is never answered from before the change."""
    r = Replica()
    entries = [
        changes.CredentialUpserted(
            k, digest(k, 0), "acme", frozenset({"checks:read"}), NOW
        ).change()
        for k in ("key_a", "key_b", "key_c")
    ]
    r.load_snapshot(1, entries)
    for k in ("key_a", "key_b", "key_c"):
        assert r.credential(digest(k, 0)) is not None
    r.apply(at(changes.CredentialRevoked("key_b").change(), 2))
    assert set(r._keys.cache) == {digest("key_a", 0), digest("key_c", 0)}
    b = r.credential(digest("key_b", 0))
    assert b is not None and b.revoked
    replaced = changes.CredentialUpserted(
        "key_c", digest("key_c", 1), "acme", frozenset({"checks:read"}), NOW
    )
    r.apply(at(replaced.change(), 3))  # key_c's secret replaced: the old digest is gone
    assert digest("key_c", 0) not in r._keys.cache and digest("key_a", 0) in r._keys.cache
    assert r.credential(digest("key_c", 0)) is None
    assert r.credential(digest("key_c", 1)) is not None


def test_keys_of_two_workspaces_with_equal_scopes_never_share_an_identity() -> None:
    """A hostile tenant's key and a victim's key with the same scopes and state: each digest
    resolves to its own workspace and id, through replacements, revocations, compactions and a
    restart."""
    with compact_after(2):
        r = Replica(inline)
        entries = [
            changes.CredentialUpserted(
                f"key_{ws}{n}", digest(f"key_{ws}{n}", 0), ws, frozenset({"checks:read"}), NOW
            ).change()
            for ws in WORKSPACES
            for n in range(3)
        ]
        r.load_snapshot(1, entries)
        workspaces = {p.workspace for p in r.table.packed.profiles}
        assert workspaces == set(WORKSPACES)
        assert len(r.table.packed.profiles) == 2  # shared within a workspace, not across
        steps = [
            changes.CredentialRevoked("key_acme0"),
            changes.CredentialUpserted(
                "key_globex0", digest("key_globex0", 1), "globex", frozenset({"checks:read"}), NOW
            ),
            changes.CredentialRevoked("key_globex1"),
            changes.CredentialUpserted(
                "key_acme1", digest("key_acme1", 1), "acme", frozenset({"checks:read"}), NOW
            ),
        ]
        for revision, message in enumerate(steps, start=2):
            r.apply(at(message.change(), revision))
            restored = Replica()
            restored.loads(r.dumps())
            for replica in (r, restored):
                for ws in WORKSPACES:
                    for n in range(3):
                        for version in range(2):
                            cred = replica.credential(digest(f"key_{ws}{n}", version))
                            if cred is not None:
                                assert cred.identity.workspace == ws
                                assert cred.id == f"key_{ws}{n}"
        assert r.compactions >= 1
        assert r.credential(digest("key_acme0", 0)).revoked  # type: ignore[union-attr]
        assert r.credential(digest("key_globex0", 0)) is None  # replaced: the old digest is gone
        assert r.credential(digest("key_globex1", 0)).revoked  # type: ignore[union-attr]


# -- the packed table: used whole or not at all ---------------------------------------------------


def table(n: int = 20) -> PackedKeys:
    return PackedKeys.pack(
        changes.CredentialUpserted(
            f"key_{i:03d}", digest(f"key_{i:03d}", 0), WORKSPACES[i % 2], frozenset(), NOW
        )
        for i in range(n)
    )


def test_a_table_round_trips_and_finds_every_key_by_digest_and_by_id() -> None:
    packed = PackedKeys.decode(table().encode())
    r = Replica()
    r.load_packed(1, packed, [])
    for i in range(20):
        key_id = f"key_{i:03d}"
        cred = r.credential(digest(key_id, 0))
        assert cred is not None and cred.id == key_id
        assert packed.digest_at(packed.row_of_id(key_id)) == digest(key_id, 0)
    assert packed.row_of_id("key_999") == -1
    assert r.credential(b"\x00" * 32) is None
    assert r.credential(b"short") is None


def _rebuilt(packed: PackedKeys, **fields: object) -> bytes:
    from dataclasses import replace

    return replace(packed, **fields).encode()  # type: ignore[arg-type]


def test_a_table_that_breaks_an_invariant_is_refused() -> None:
    packed = table()
    good = packed.encode()
    d = packed.digests
    swapped = d[32:64] + d[:32] + d[64:]  # two rows out of order
    order = packed.id_order.tolist()
    order[0], order[1] = order[1], order[0]
    from array import array

    broken = {
        "unsorted digests": _rebuilt(packed, digests=swapped),
        "duplicate digest": _rebuilt(packed, digests=d[:32] * 2 + d[64:]),
        "id order": _rebuilt(packed, id_order=array("I", order)),
        "profile index": _rebuilt(packed, profile_of=array("I", [7] * len(packed))),
        "truncated": good[:-1],
        "trailing": good + b"\0",
        "magic": b"XXXX" + good[4:],
        "version": good[:4] + struct.pack("<H", 9) + good[6:],
        "empty": b"",
    }
    for name, data in broken.items():
        with pytest.raises(PackError):
            PackedKeys.decode(data)
        assert name


# -- the replica file -----------------------------------------------------------------------------


def _populated(fold_runner: Callable[[FoldJob], None] = inline) -> Replica:
    r = Replica(fold_runner)
    r.load_packed(
        3,
        table(),
        [
            changes.SigningKeyUpserted("k1", "ES256", {"kty": "EC"}).change(),
            changes.GrantRevoked("grt_1", NOW).change(),
            changes.TokenRevoked("jti_1", NOW).change(),
        ],
        "log-a",
    )
    r.apply(at(changes.CredentialRevoked("key_001").change(), 4))
    replaced = changes.CredentialUpserted(
        "key_002", digest("key_002", 1), "acme", frozenset({"checks:read"}), NOW
    )
    r.apply(at(replaced.change(), 5))
    r.last_contact = 123.5
    return r


def test_the_replica_file_round_trips_table_overlay_and_the_rest() -> None:
    r = _populated()
    restored = Replica()
    restored.loads(r.dumps())
    assert (restored.revision, restored.log_id, restored.last_contact) == (5, "log-a", 123.5)
    assert dict(restored.by_digest) == dict(r.by_digest)
    assert restored.credential(digest("key_002", 0)) is None
    assert restored.credential(digest("key_001", 0)).revoked  # type: ignore[union-attr]
    assert restored.signing_keys == r.signing_keys
    assert restored.revoked_grants == r.revoked_grants
    assert restored.revoked_jtis == r.revoked_jtis


@pytest.mark.parametrize("damage", ["flip", "truncate", "version", "foreign"])
def test_a_damaged_or_foreign_replica_file_is_refused_whole(damage: str) -> None:
    data = _populated().dumps()
    if damage == "flip":
        cases = [data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :] for i in range(0, len(data), 7)]
    elif damage == "truncate":
        cases = [data[:i] for i in range(0, len(data), 11)]
    elif damage == "version":
        body = data[:8] + struct.pack("<I", 3) + data[12:-32]
        cases = [body + hashlib.sha256(body).digest()]
    else:
        cases = [b"\x89PNG\r\n\x1a\n" + data[8:], b'{"format": 7}']
    for case in cases:
        before = _populated()
        with pytest.raises(ReplicaError):
            before.loads(case)
        assert before.revision == 5 and before.log_id == "log-a"  # untouched
        fresh = Replica()
        with pytest.raises(ReplicaError):
            fresh.loads(case)
        assert not fresh.loaded and len(fresh.by_digest) == 0


def test_a_credential_is_the_same_value_whether_built_from_the_table_or_the_overlay() -> None:
    r = _populated()
    cred = r.credential(digest("key_003", 0))
    assert isinstance(cred, Credential)
    assert r.fold()
    assert r.credential(digest("key_003", 0)) == cred
    assert r.overlay_size == 0


def test_a_replica_json_of_the_previous_format_loads_once_then_becomes_replica_bin(
    tmp_path: Path,
) -> None:
    old = _populated()
    # Format 1 as the previous version wrote it: every entry as JSON.
    document = {
        "format": 1,
        "revision": old.revision,
        "log_id": old.log_id,
        "last_contact": old.last_contact,
        "entries": [{"kind": c.kind, "subject": c.subject, "payload": c.payload}
                    for c in old.entries()],
    }  # fmt: skip
    (tmp_path / "replica.json").write_text(json.dumps(document))
    f = ReplicaFile(tmp_path)
    upgraded = Replica()
    assert f.load(upgraded)
    assert (upgraded.revision, upgraded.log_id, upgraded.last_contact) == (5, "log-a", 123.5)
    assert dict(upgraded.by_digest) == dict(old.by_digest)
    assert upgraded.signing_keys == old.signing_keys
    f.save(upgraded)
    assert not (tmp_path / "replica.json").exists()
    assert (tmp_path / "replica.bin").stat().st_mode & 0o777 == 0o600
    again = Replica()
    assert f.load(again) and dict(again.by_digest) == dict(old.by_digest)


def test_a_corrupt_replica_file_leaves_the_sidecar_waiting_for_a_snapshot(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    f = ReplicaFile(tmp_path)
    f.save(_populated())
    data = (tmp_path / "replica.bin").read_bytes()
    (tmp_path / "replica.bin").write_bytes(data[: len(data) // 2])
    r = Replica()
    assert not f.load(r)
    assert not r.loaded and len(r.by_digest) == 0  # fails closed: replica_not_ready
    (record,) = [r for r in caplog.records if r.name == "sidecar.sync"]
    assert "checksum mismatch" in record.error  # type: ignore[attr-defined]


# -- folding off the sync thread ------------------------------------------------------------------


def upsert(key_id: str, version: int = 0, ws: str = "acme") -> Change:
    return changes.CredentialUpserted(
        key_id, digest(key_id, version), ws, frozenset({"checks:read"}), NOW
    ).change()


def test_a_key_revoked_while_a_fold_builds_is_denied_at_once_and_after_the_swap() -> None:
    """A real fold thread builds its table from the overlay as it was before two revocations
    (one of a table key, one of a key in the overlay it folds) and is held between building and
    swapping: both keys are denied as soon as each revocation is applied, while the fold waits,
    and after its table is swapped in; a second fold does not begin meanwhile."""
    built, release = threading.Event(), threading.Event()
    folds: list[threading.Thread] = []

    def held(job: FoldJob) -> None:
        def run() -> None:
            job.build()
            built.set()
            release.wait(30)
            job.install()

        folds.append(threading.Thread(target=run))
        folds[-1].start()

    with compact_after(2):
        r = Replica(held)
        r.load_packed(1, table(), [])
        for revision, key_id in enumerate(("key_100", "key_101", "key_102"), start=2):
            r.apply(at(upsert(key_id), revision))
        assert built.wait(30) and len(folds) == 1  # the third change made a fold due
        for key_id in ("key_005", "key_101"):  # cached before the revocation
            assert not r.credential(digest(key_id, 0)).revoked  # type: ignore[union-attr]
        r.apply(at(changes.CredentialRevoked("key_005").change(), 5))
        r.apply(at(changes.CredentialRevoked("key_101").change(), 6))
        r.apply(at(upsert("key_103"), 7))
        for key_id in ("key_005", "key_101"):
            assert r.credential(digest(key_id, 0)).revoked  # type: ignore[union-attr]
        assert not r.fold() and len(folds) == 1  # one fold at a time
        release.set()
        folds[0].join(30)
        assert r.compactions == 1 and r._fold is None
        for key_id in ("key_005", "key_101"):
            assert r.credential(digest(key_id, 0)).revoked  # type: ignore[union-attr]
        assert r.credential(digest("key_103", 0)) is not None
        assert r.table.row(digest("key_101", 0)) >= 0  # folded, its revocation carried over
        assert r.overlay_size == 3  # key_005, key_101 (revoked since the copy) and key_103
        restored = Replica(inline)
        restored.loads(r.dumps())
        assert restored.credential(digest("key_101", 0)).revoked  # type: ignore[union-attr]


def test_a_fold_overtaken_by_a_snapshot_is_dropped() -> None:
    folds = SteppedFolds()
    r = Replica(folds)
    r.load_packed(1, table(), [])
    r.apply(at(upsert("key_100"), 2))
    assert r.fold()
    r.load_packed(3, table(3), [])  # a newer snapshot without key_100
    folds.install()
    assert r.folds_dropped == 1 and r.compactions == 0
    assert r.credential(digest("key_100", 0)) is None and len(r.by_digest) == 3


def test_changes_applied_while_fold_threads_run_answer_as_the_dict_replica() -> None:
    """Real fold threads, started every few changes, race the changes applied on this thread:
    after every change the replica answers what the reference answers."""
    rng = random.Random(19)
    with compact_after(3):
        dense, ref = Replica(), DictReplica()
        dense.load_snapshot(1, [upsert(k) for k in IDS], "log")
        ref.load_snapshot(1, [upsert(k) for k in IDS], "log")
        versions = dict.fromkeys(IDS, 0)
        for revision in range(2, 1500):
            key_id = rng.choice(IDS)
            if rng.random() < 0.3:
                change = changes.CredentialRevoked(key_id).change()
            else:
                versions[key_id] = rng.randrange(3)
                change = upsert(key_id, versions[key_id], rng.choice(WORKSPACES))
            dense.apply(at(change, revision))
            ref.apply(at(change, revision))
            for d in ALL_DIGESTS:
                assert dense.credential(d) == ref.by_digest.get(d)
        assert dense.compactions > 10
