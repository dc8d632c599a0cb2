"""The control plane's packed key table built straight from the store's ``packing_rows``: the
table ``PackedKeys.pack_rows`` makes of the same keys' ``replica_rows`` (sidecar/core/packed.py
keeps the format and the reference builder; tests/test_replication_packing.py holds the two to
byte-identical output), at about a third of the cost per key.

Where the time went in ``replica_rows`` + ``pack_rows`` (≈ 7.5 µs of CPU per key): ten values per
row, a frozenset and a tuple per key for its profile, and the rows sorted and re-read as 11-tuples.
Here the database folds the grace deadline into the expiry and writes the shared part as one JSON
text, so a row is four values; the rows are taken in chunks (the JSON texts of a chunk are
dropped once interned) and every column is moved with C-level iteration, never a Python loop
body per key. Only the few distinct profiles are parsed.

Where the C extension is built (sidecar/core/_packing.c, optional like the others), the
rows are read in table order instead (the database's sort by digest was ≈ 1.1 µs of the ≈ 5 µs
per key left) and handed to it one at a time: it copies the columns, sorts by digest and by id
(radix sorts) and returns the table's columns. Rows it would not pack exactly as this module
does (the cases that end in a PackError) make it return None, and the keys are read again and
packed here, the reference, which raises the error those rows deserve."""

from __future__ import annotations

import json
import operator
from array import array
from collections.abc import Iterable
from itertools import islice, repeat

from sidecar.core.native import optional_module
from sidecar.core.packed import DIGEST_SIZE, MAX_ID_WIDTH, PackedKeys, PackError, Profile
from sidecar.core.storage import PackRow, UnitOfWork

_native, _IMPORT_ERROR = optional_module("sidecar.core._packing")

CHUNK = 1 << 16
_DIGEST, _ID, _EXPIRES, _PROFILE = (operator.itemgetter(i) for i in range(4))

# A profile as packed.py interns it: (workspace, scopes, rate_limit, rate_period, client_cidrs,
# revoked, suspended), scopes as a set (two orders of one set are one profile).
_Canonical = tuple[str, frozenset[str], int, int, tuple[str, ...], bool, bool]


def packed_keys(uow: UnitOfWork, now: int) -> PackedKeys:
    """Every usable key as one packed key table (the API-key part of a packed snapshot), read
    in ``uow``'s transaction; PackError when a key cannot be packed."""
    if _native is not None:
        table = native_table(uow.keys.packing_rows(now, ordered=False))
        if table is not None:
            return table
    return pack_store_rows(uow.keys.packing_rows(now))


def unavailable() -> str:
    """Why the compiled packing cannot run here ('' when it can)."""
    return _IMPORT_ERROR


def native_table(rows: Iterable[PackRow]) -> PackedKeys | None:
    """``pack_store_rows(rows)`` (``rows`` in any order) packed in C; None when the extension is
    not built or a row needs the Python path (which then gives the table or the PackError)."""
    columns = _native.columns(rows) if _native is not None else None
    if columns is None:
        return None
    digests, ids, width, expires, raw, id_order, texts = columns
    profile_of, profiles = _profiles(_column("I", raw), texts)
    table = PackedKeys(
        digests=digests,
        ids=ids,
        width=width,
        expires=_column("q", expires),
        profile_of=profile_of,
        id_order=_column("I", id_order),
        profiles=profiles,
    )
    table.check_digests()  # sorted and unique in C; checked here, never trusted
    return table


def _column(code: str, raw: bytes) -> array[int]:
    """A column the extension wrote in this machine's byte order."""
    column = array(code)
    column.frombytes(raw)
    return column


def pack_store_rows(rows: Iterable[PackRow]) -> PackedKeys:
    """The table of ``rows`` (ids unique, as the store's primary key makes them): exactly
    ``PackedKeys.pack_rows`` of the same keys as ``KeyRow``s, PackError in the same cases."""
    digests: list[bytes] = []
    ids: list[str] = []
    expires = array("q")
    texts: dict[str, int] = {}  # each distinct profile text, numbered as first read
    raw = array("I")  # each row's profile text, by that number
    source = iter(rows)
    while chunk := list(islice(source, CHUNK)):
        digests += map(_DIGEST, chunk)
        ids += map(_ID, chunk)
        expires.extend(map(_EXPIRES, chunk))
        column = list(map(_PROFILE, chunk))
        for text in dict.fromkeys(column).keys() - texts.keys():
            texts[text] = len(texts)
        raw.extend(map(texts.__getitem__, column))
    return _table(digests, ids, expires, raw, list(texts))


def _table(
    digests: list[bytes], ids: list[str], expires: array[int], raw: array[int], texts: list[str]
) -> PackedKeys:
    """The columns (in read order) as a table, rows in digest order; the checks and their
    order are ``pack_rows``'s."""
    # The store reads the rows in digest order (a sort in the database costs a third of one
    # here, where every column would then be permuted at random); checked, never trusted.
    if not all(map(operator.lt, digests, islice(digests, 1, None))):
        order = sorted(range(len(digests)), key=digests.__getitem__)
        digests = list(map(digests.__getitem__, order))
        ids = list(map(ids.__getitem__, order))
        expires = array("q", map(expires.__getitem__, order))
        raw = array("I", map(raw.__getitem__, order))
    if not set(map(len, digests)) <= {DIGEST_SIZE}:
        raise PackError("packed keys: a digest is not 32 bytes")
    width = max(max(map(len, ids), default=1), 1)
    joined = "".join(ids)
    if not (joined.isascii() and joined.isprintable()) or not (
        min(map(len, ids), default=1) > 0 and width <= MAX_ID_WIDTH
    ):
        raise PackError("packed keys: a key id is not 1 to 255 printable ASCII characters")
    if min(map(len, ids), default=width) == width:  # the usual case: minted ids, one length
        id_block = joined.encode("ascii")
    else:
        id_block = "".join(map(str.ljust, ids, repeat(width), repeat("\0"))).encode("ascii")
    profile_of, profiles = _profiles(raw, texts)
    table = PackedKeys(
        digests=b"".join(digests),
        ids=id_block,
        width=width,
        expires=expires,
        profile_of=profile_of,
        id_order=array("I", sorted(range(len(ids)), key=ids.__getitem__)),
        profiles=profiles,
    )
    table.check_digests()
    return table


def _profiles(raw: array[int], texts: list[str]) -> tuple[array[int], tuple[Profile, ...]]:
    """Each row's profile index and the profiles, numbered in order of first use (rows in
    digest order) as ``pack_rows`` numbers them: texts that differ only in the order of their
    scopes, say, are one profile."""
    index: dict[_Canonical, int] = {}
    remap = [0] * len(texts)
    for number in dict.fromkeys(raw):  # the texts in order of first use
        remap[number] = index.setdefault(_canonical(texts[number]), len(index))
    profiles = tuple(
        Profile(ws, tuple(sorted(sc)), rl, rp, cidrs, rv, su)
        for ws, sc, rl, rp, cidrs, rv, su in index
    )
    return array("I", map(remap.__getitem__, raw)), profiles


def _canonical(text: str) -> _Canonical:
    """A profile text as ``replica_rows`` makes it a key's fields (never revoked: the query
    reads unrevoked keys only)."""
    workspace, scopes, rate_limit, rate_period, cidrs, suspended = json.loads(text)
    return (
        workspace,
        frozenset(scopes.split()),
        rate_limit,
        rate_period,
        tuple(cidrs.split()),
        False,
        bool(suspended),
    )
