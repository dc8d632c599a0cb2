"""The snapshot build's lean packer (sidecar/replication/packing.py) against the reference
(``replica_rows`` + ``PackedKeys.pack_rows``): byte-identical tables from hypothesis-generated
stores in a real SQLite file (revoked, expired, replaced and suspended keys, several workspaces,
ids of several lengths, scopes stored in any order), PackError in the same cases, the same
snapshot file, and a key revoked while the snapshot is built never usable. The compiled packing
(sidecar/core/_packing.c) is held to the same bytes, on rows in any order, and hands the
rows that end in a PackError back to the Python path (returns None) instead of packing them."""

from __future__ import annotations

import bisect
import json
import random
import sqlite3
import threading
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.authz.replica import Replica
from sidecar.core.apikeys import ApiKeyService, key_rows
from sidecar.core.changes import oauth_snapshot
from sidecar.core.clock import FakeClock
from sidecar.core.models import ApiKey, Principal, RequestContext
from sidecar.core.packed import PackedKeys, PackError
from sidecar.core.storage import KeyRow, PackRow, Store, UnitOfWork
from sidecar.replication import packing
from sidecar.replication.packing import native_table, pack_store_rows, packed_keys
from sidecar.replication.server import ReplicationServicer
from sidecar.replication.snapshot_file import FILE_NAME
from sidecar.store.sql.sqlite import SqliteStore

NOW = 1_000_000
OPERATOR = RequestContext(Principal("key_op", "*", frozenset({"admin:full"})), "req-test")
WORKSPACES = ["acme", "globex", "ws ü", 'q"uo\\te', "*"]
SCOPES = ["checks:read", "keys:write", "metrics:read", "a"]
CIDRS = ["10.0.0.0/8", "192.168.1.0/24", "::1/128"]

times = st.integers(NOW - 1000, NOW + 1000)
key_specs = st.fixed_dictionaries(
    {
        "id": st.text("abcdefghijklmnopqrstuvwxyz0123456789_", min_size=1, max_size=24),
        "digest": st.binary(min_size=32, max_size=32),
        "workspace": st.sampled_from(WORKSPACES),
        "scopes": st.lists(st.sampled_from(SCOPES), unique=True),
        "expires_at": times,
        "revoked_at": st.none() | times,
        "grace_deadline": st.none() | st.just(0) | times,
        "suspended_at": st.none() | times,
        "rate": st.sampled_from([(0, 0), (5, 60), (100, 1)]),
        "client_cidrs": st.lists(st.sampled_from(CIDRS), unique=True, max_size=2),
        # Scopes as an older version or a hand edit may have stored them: any order, spaces.
        "scope_text": st.sampled_from(["sorted", "reversed", "spaced"]),
    }
)
stores = st.lists(key_specs, max_size=40, unique_by=(lambda k: k["id"], lambda k: k["digest"]))


def api_key(spec: dict[str, object]) -> ApiKey:
    rate = spec["rate"]
    assert isinstance(rate, tuple)
    return ApiKey(
        id=str(spec["id"]), digest=spec["digest"], last_four="abcd", name="k",  # type: ignore[arg-type]
        workspace=str(spec["workspace"]), scopes=frozenset(spec["scopes"]),  # type: ignore[arg-type]
        created_at=NOW - 5000, expires_at=spec["expires_at"], created_by="test",  # type: ignore[arg-type]
        revoked_at=spec["revoked_at"], grace_deadline=spec["grace_deadline"],  # type: ignore[arg-type]
        rate_limit=rate[0], rate_period=rate[1], suspended_at=spec["suspended_at"],  # type: ignore[arg-type]
        client_cidrs=tuple(spec["client_cidrs"]),  # type: ignore[arg-type]
    )  # fmt: skip


def scope_text(spec: dict[str, object]) -> str:
    scopes = sorted(spec["scopes"])  # type: ignore[call-overload]
    if spec["scope_text"] == "reversed":
        return " ".join(reversed(scopes))
    if spec["scope_text"] == "spaced":
        return "  ".join(scopes) + " "
    return " ".join(scopes)


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SqliteStore, Path]]:
    path = tmp_path_factory.mktemp("packing") / "spauth.db"
    store = SqliteStore(path)
    yield store, path
    store.close()


def reference(uow: UnitOfWork, now: int) -> bytes:
    return PackedKeys.pack_rows(list(uow.keys.replica_rows(now))).encode()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=stores, now=times)
def test_the_lean_packer_packs_a_store_as_the_reference_does(
    db: tuple[SqliteStore, Path], specs: list[dict[str, object]], now: int
) -> None:
    store, path = db
    with sqlite3.connect(path) as raw:
        raw.execute("DELETE FROM api_keys")
    with store.transaction() as uow:
        for spec in specs:
            uow.keys.insert(api_key(spec))
    with sqlite3.connect(path) as raw:
        raw.executemany(
            "UPDATE api_keys SET scopes = ? WHERE id = ?",
            [(scope_text(spec), spec["id"]) for spec in specs],
        )
    with store.read() as uow:
        lean = packed_keys(uow, now).encode()  # compiled where it is built
        assert lean == reference(uow, now)
        assert pack_store_rows(uow.keys.packing_rows(now)).encode() == lean  # the Python path
    table = PackedKeys.decode(lean)
    assert len(table) == sum(
        spec["revoked_at"] is None and spec["expires_at"] > now  # type: ignore[operator]
        for spec in specs
    )


# Rows straight to both packers, without a store: ids and digests the store would refuse too.
row_specs = st.lists(
    st.tuples(
        st.text(min_size=0, max_size=6) | st.sampled_from(["key_1", "key_2", "k" * 256]),
        st.binary(min_size=31, max_size=33) | st.sampled_from([b"\1" * 32, b"\2" * 32]),
        st.sampled_from(WORKSPACES),
        st.lists(st.sampled_from(SCOPES), unique=True),
        st.integers(-(2**40), 2**40),
        st.none() | st.just(0) | st.integers(-(2**40), 2**40),
        st.booleans(),
    ),
    max_size=12,
    unique_by=lambda r: r[0],  # ids are the store's primary key
)


def as_rows(
    spec: tuple[str, bytes, str, list[str], int, int | None, bool],
) -> tuple[KeyRow, PackRow]:
    key_id, digest, workspace, scopes, expires, grace, suspended = spec
    key: KeyRow = (key_id, digest, workspace, frozenset(scopes), expires, 5, 60, False, grace,
                   suspended, ("10.0.0.0/8",))  # fmt: skip
    folded = min(expires, grace or expires)
    profile = json.dumps([workspace, " ".join(scopes), 5, 60, "10.0.0.0/8", int(suspended)])
    return key, (digest, key_id, folded, profile)


def outcome(pack: object) -> bytes | str:
    try:
        return pack().encode()  # type: ignore[operator, no-any-return]
    except PackError as exc:
        return f"PackError: {exc}"


@settings(max_examples=300, deadline=None)
@given(specs=row_specs)
def test_both_packers_refuse_the_same_rows_with_the_same_error(
    specs: list[tuple[str, bytes, str, list[str], int, int | None, bool]],
) -> None:
    pairs = [as_rows(spec) for spec in specs]
    keys = [key for key, _ in pairs]
    rows = [row for _, row in pairs]
    expected = outcome(lambda: PackedKeys.pack_rows(keys))
    assert outcome(lambda: pack_store_rows(rows)) == expected
    assert_compiled_packs(rows, expected)


def assert_compiled_packs(rows: list[PackRow], expected: bytes | str, seed: int = 0) -> None:
    """The compiled packing of ``rows`` in any order is ``expected`` (the reference's table),
    or None (the Python path then packs them) exactly when the reference raises PackError."""
    shuffled = random.Random(seed).sample(rows, len(rows))
    native = native_table(shuffled)
    if packing.unavailable():
        assert native is None
    elif isinstance(expected, str):
        assert native is None, expected
    else:
        assert native is not None and native.encode() == expected


# Many rows (the radix sorts take over from an insertion sort at 32), with ids and digests that
# share long prefixes and tie on whole 8-byte windows, so every refinement step runs.
ID_HEADS = ["", "key_", "tenant-0000000000000000-", "k" * 30]
DIGEST_HEADS = [b"", b"\0" * 8, b"\7" * 16, b"\1" * 24, b"\1" * 31]
many_rows = st.lists(
    st.tuples(
        st.sampled_from(ID_HEADS),
        st.text("ab0~ ", max_size=12),
        st.sampled_from(DIGEST_HEADS),
        st.binary(min_size=32, max_size=32),
        st.integers(-(2**62), 2**62),
        st.sampled_from(WORKSPACES),
    ),
    min_size=33,
    max_size=300,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=many_rows, seed=st.integers(0, 2**32))
def test_the_compiled_packing_sorts_as_the_reference_does(
    specs: list[tuple[str, str, bytes, bytes, int, str]], seed: int
) -> None:
    by_id = {head + tail: ((head + tail)[:255], (d_head + digest)[:32], expires, ws)
             for head, tail, d_head, digest, expires, ws in specs}  # fmt: skip
    keys: list[KeyRow] = [(key_id, digest, ws, frozenset(), expires, 0, 0, False, None, False, ())
                          for key_id, digest, expires, ws in by_id.values()]  # fmt: skip
    rows: list[PackRow] = [(digest, key_id, expires, json.dumps([ws, "", 0, 0, "", 0]))
                           for key_id, digest, expires, ws in by_id.values()]  # fmt: skip
    expected = outcome(lambda: PackedKeys.pack_rows(keys))
    assert outcome(lambda: pack_store_rows(rows)) == expected
    assert_compiled_packs(rows, expected, seed)


def test_the_compiled_packing_hands_odd_rows_back_to_the_python_path() -> None:
    if packing.unavailable():
        pytest.skip(f"the compiled packing is not built here: {packing.unavailable()}")
    good: PackRow = (b"\1" * 32, "key_1", 5, '["acme","",0,0,"",0]')
    assert native_table([good]) is not None
    assert native_table([]) is not None and len(native_table([]) or ()) == 0
    odd: list[object] = [
        [good[0], good[1], good[2], good[3]],  # not a tuple
        good[:3],
        (memoryview(good[0]), *good[1:]),
        (good[0], "key_\u00e9", *good[2:]),  # not ASCII
        (good[0], "key\t1", *good[2:]),  # not printable
        (good[0], "", *good[2:]),
        (good[0], "k" * 256, *good[2:]),
        (good[0], good[1], 2**63, good[3]),  # beyond int64
        (good[0], good[1], True, good[3]),
        (good[0], good[1], good[2], b"[]"),
        (good[0], "key_2", *good[2:]),  # the same digest twice
        (b"\2" * 32, good[1], *good[2:]),  # the same id twice
    ]
    for row in odd:
        assert native_table([good, row]) is None, row  # type: ignore[list-item]


def servicer(store: Store, clock: FakeClock, path: Path, *, lean: bool) -> ReplicationServicer:
    return ReplicationServicer(
        store, clock, [oauth_snapshot], key_source=key_rows,
        packed_key_source=packed_keys if lean else None, snapshot_file=path,
    )  # fmt: skip


def test_the_snapshot_file_is_the_one_the_reference_builder_writes(
    store: Store, clock: FakeClock, tmp_path: Path
) -> None:
    service = ApiKeyService(store, clock)
    minted = [
        service.create(OPERATOR, workspace=f"ws{i % 3}", name=f"k{i}", scopes=["checks:read"])
        for i in range(30)
    ]
    service.revoke(OPERATOR, minted[3].key.id)
    service.replace(OPERATOR, minted[4].key.id, grace=60)
    service.suspend(OPERATOR, minted[5].key.id)
    lean, old = (
        servicer(store, clock, tmp_path / "lean" / FILE_NAME, lean=True),
        servicer(store, clock, tmp_path / "old" / FILE_NAME, lean=False),
    )
    lean.prepare()
    old.prepare()
    assert (lean.packed_builds, old.packed_builds) == (1, 1)
    assert (tmp_path / "lean" / FILE_NAME).read_bytes() == (
        tmp_path / "old" / FILE_NAME
    ).read_bytes()


def test_a_key_revoked_while_the_snapshot_is_built_is_never_usable(
    store: Store, clock: FakeClock, tmp_path: Path
) -> None:
    service = ApiKeyService(store, clock)
    minted = [
        service.create(OPERATOR, workspace="acme", name=f"k{i}", scopes=["checks:read"])
        for i in range(20)
    ]
    victim = minted[11]

    def packing_then_revoke(uow: UnitOfWork, now: int) -> PackedKeys:
        table = packed_keys(uow, now)  # the victim is in it: read before the revocation
        # Another thread revokes it and commits while this build's transaction is still open.
        revoker = threading.Thread(target=service.revoke, args=(OPERATOR, victim.key.id))
        revoker.start()
        revoker.join()
        return table

    s = ReplicationServicer(
        store, clock, [oauth_snapshot], key_source=key_rows,
        packed_key_source=packing_then_revoke, snapshot_file=tmp_path / FILE_NAME,
    )  # fmt: skip
    s.prepare()
    assert s.snapshots.current() is not None
    revision, packed, entries = s.shared_packed_snapshot()
    table = PackedKeys.decode(packed)
    assert table.row_of_id(victim.key.id) >= 0  # packed before the revocation ...
    replica = Replica()
    replica.load_packed(revision, table, entries)  # ... which travels with it
    credential = replica.credential(victim.key.digest)
    assert credential is not None and credential.revoked


id_blocks = st.integers(1, 5).flatmap(
    lambda w: st.tuples(
        st.just(w),
        st.lists(
            st.binary(min_size=w, max_size=w).map(lambda b: b.replace(b"\x01", b"\0")), max_size=40
        ),
    )
)


@settings(max_examples=300, deadline=None)
@given(block=id_blocks, data=st.data())
def test_the_compiled_id_order_check_agrees_with_the_loop(
    block: tuple[int, list[bytes]], data: st.DataObject
) -> None:
    """``ids_ascending`` compiled and in Python, on id orders that are right (the ids sorted)
    and wrong (any permutation, a row out of range, NULs anywhere, repeated ids)."""
    from array import array

    from sidecar.core import packed

    width, rows = block
    ids = b"".join(rows)
    order = array("I", data.draw(st.permutations(range(len(rows)))))
    if data.draw(st.booleans()):  # mostly sorted: the orders a valid table holds
        order = array("I", sorted(range(len(rows)), key=rows.__getitem__))
    if rows and data.draw(st.booleans()):
        order[data.draw(st.integers(0, len(rows) - 1))] = data.draw(st.integers(0, len(rows) + 1))
    expected = packed.ids_ascending(ids, width, order)
    if packed._native is not None:
        got = packed._native.ids_ascending(ids, width, order)
        assert got is expected or (got is None and max(order) >= len(rows))


def test_a_table_with_its_ids_out_of_order_is_refused_either_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sidecar.core import packed

    table = PackedKeys.pack_rows(
        [
            (f"key_{i}", bytes([i]) * 32, "acme", frozenset(), 5, 0, 0, False, None, False, ())
            for i in range(40)
        ]
    )
    good = table.encode()
    bad = bytearray(good)
    at = len(good) - 4 * len(table)  # the id order, the last column: swap its first two rows
    bad[at : at + 8] = good[at + 4 : at + 8] + good[at : at + 4]
    refusals = []
    for native in (packed._native, None):
        monkeypatch.setattr(packed, "_native", native)
        assert PackedKeys.decode(good).encode() == good
        with pytest.raises(PackError) as refused:
            PackedKeys.decode(bytes(bad))
        refusals.append(str(refused.value))
    assert refusals == ["packed keys: key ids are empty, padded wrongly or out of order"] * 2


@settings(max_examples=200, deadline=None)
@given(
    digests=st.lists(
        st.sampled_from([b"", b"\0\0", b"\xff\xff", b"\x80"]).flatmap(
            lambda head: st.binary(min_size=32, max_size=32).map(lambda d: (head + d)[:32])
        ),
        unique=True,
        max_size=200,
    ),
    bits=st.integers(0, 12),
)
def test_the_compiled_bucket_index_is_the_bisections(digests: list[bytes], bits: int) -> None:
    """KeyTable's bucket index (the first row of each digest bucket) compiled and bisected."""
    from array import array

    from sidecar.authz import keytable
    from sidecar.core.packed import prefix_column

    block = b"".join(sorted(digests))
    prefixes = prefix_column(block)
    expected = array(
        "I", (bisect.bisect_left(prefixes, b << (64 - bits)) for b in range(1 << bits))
    )
    expected.append(len(digests))
    assert keytable.bucket_starts(block, bits) == expected
    if keytable._native is None:
        pytest.skip(f"the compiled packing is not built here: {packing.unavailable()}")
    assert keytable._native.bucket_starts(block + b"x", bits) is None  # not whole digests
    assert keytable._native.bucket_starts(block, 25) is None


def table_bytes() -> bytes:
    return PackedKeys.pack_rows(
        [
            (f"key_{i}" + "x" * (i % 3), bytes([i, 7]) * 16, f"ws{i % 3}", frozenset({"a"}),
             1000 + i, 0, 0, False, None, i % 5 == 0, ())
            for i in range(50)
        ]
    ).encode()  # fmt: skip


def pieces(data: bytes, cuts: list[int]) -> list[bytes | memoryview]:
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    return [data[a:b] for a, b in pairwise(bounds)]


@settings(max_examples=300, deadline=None)
@given(
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
    damage=st.sampled_from(["none", "truncate", "trail", "flip", "header"]),
    at=st.integers(0, 10_000),
)
def test_a_table_decoded_from_its_pieces_is_the_table_decoded_whole(
    cuts: list[int], damage: str, at: int
) -> None:
    """``decode_chunks`` (a snapshot's pieces as they arrived, never joined) gives the table
    ``decode`` gives, or the same PackError, however the bytes are cut and damaged."""
    data = bytearray(table_bytes())
    where = at % len(data)
    if damage == "truncate":
        del data[where:]
    elif damage == "trail":
        data += b"\0"
    elif damage == "flip":
        data[where] ^= 0x41
    elif damage == "header":
        data[at % 16] ^= 0x01
    whole = bytes(data)
    chunks = pieces(whole, cuts)
    assert outcome(lambda: PackedKeys.decode_chunks(chunks)) == outcome(
        lambda: PackedKeys.decode(whole)
    )
    assert chunks == []  # emptied: the caller holds no piece of the table any more
