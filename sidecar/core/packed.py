"""The packed key table: many ``credential.upserted`` entries as a few columns, the form in
which a snapshot's API keys travel (``Snapshot.packed_keys``), are persisted (the replica file)
and are kept by a sidecar's replica. Only this module writes or reads it.

Rows are sorted by digest. Per row: the 32-byte digest, the key id (ASCII, NUL-padded to the
table's ``width``), the expiry (the grace deadline of a replaced key folded in) and the index of
its *profile*: the part many keys share (workspace, scopes, rate limit, client networks, revoked,
suspended). ``id_order`` lists the rows in ascending key-id order, for revocation by id.

Encoded (little-endian): header ``<4sHHII`` (magic ``SPKT``, version, width, rows, length of the
profiles' JSON), the profiles as a JSON list of
``[workspace, scopes, rate_limit, rate_period, client_cidrs, revoked, suspended]``, then the
columns one after the other: digests (rows x 32), ids (rows x width), expiries (rows x int64),
profile indexes (rows x uint32), id order (rows x uint32). ``decode`` checks every invariant a
lookup relies on (lengths, order, ranges) and raises ``PackError`` otherwise: a table is used
whole or not at all."""

from __future__ import annotations

import json
import operator
import struct
import sys
from array import array
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import compress, islice

from sidecar.core.changes import CredentialUpserted
from sidecar.core.native import optional_module
from sidecar.core.storage import KeyRow

MAGIC = b"SPKT"
VERSION = 1
DIGEST_SIZE = 32
MAX_ID_WIDTH = 255
_HEADER = struct.Struct("<4sHHII")
_LITTLE = sys.byteorder == "little"
_native, _ = optional_module("sidecar.core._packing")

for _code, _size in (("q", 8), ("I", 4), ("Q", 8)):
    if array(_code).itemsize != _size:  # pragma: no cover - every platform we ship to
        raise ImportError(f"array('{_code}') is not {_size} bytes here")


class PackError(ValueError):
    """A packed key table that is malformed, truncated or of another version."""


@dataclass(frozen=True, slots=True)
class Profile:
    """What keys share: two keys of one workspace with the same scopes, limits, networks and
    state have the same profile; keys of different workspaces never do."""

    workspace: str
    scopes: tuple[str, ...]  # sorted
    rate_limit: int = 0
    rate_period: int = 0
    client_cidrs: tuple[str, ...] = ()
    revoked: bool = False
    suspended: bool = False

    @classmethod
    def of(cls, m: CredentialUpserted) -> Profile:
        return cls(
            m.workspace,
            tuple(sorted(m.scopes)),
            m.rate_limit,
            m.rate_period,
            m.client_cidrs,
            m.revoked,
            m.suspended,
        )

    def to_json(self) -> list[object]:
        return [
            self.workspace,
            list(self.scopes),
            self.rate_limit,
            self.rate_period,
            list(self.client_cidrs),
            self.revoked,
            self.suspended,
        ]

    @classmethod
    def from_json(cls, raw: object) -> Profile:
        if not isinstance(raw, list) or len(raw) != 7:
            raise PackError("packed keys: a profile is not a 7-item list")
        ws, scopes, limit, period, cidrs, revoked, suspended = raw
        if not (
            isinstance(ws, str)
            and isinstance(scopes, list)
            and all(isinstance(s, str) for s in scopes)
            and type(limit) is int
            and type(period) is int
            and isinstance(cidrs, list)
            and all(isinstance(c, str) for c in cidrs)
            and isinstance(revoked, bool)
            and isinstance(suspended, bool)
        ):
            raise PackError("packed keys: a profile field has the wrong type")
        return cls(ws, tuple(sorted(scopes)), limit, period, tuple(cidrs), revoked, suspended)


# What keys share, as interned while packing: a Profile with the scopes not yet sorted.
_ProfileKey = tuple[str, frozenset[str], int, int, tuple[str, ...], bool, bool]
# A message's fields as a KeyRow (the same order), and the columns of a KeyRow.
AS_ROW = operator.attrgetter(
    "id", "digest", "workspace", "scopes", "expires_at", "rate_limit", "rate_period",
    "revoked", "grace_deadline", "suspended", "client_cidrs",
)  # fmt: skip
_ID, _DIGEST, _EXPIRES, _GRACE = (operator.itemgetter(i) for i in (0, 1, 4, 8))
_PROFILE = operator.itemgetter(2, 3, 5, 6, 10, 7, 9)  # the order of Profile's fields


@dataclass(frozen=True, slots=True)
class PackedKeys:
    digests: bytes  # rows x 32, strictly ascending
    ids: bytes  # rows x width, ASCII, NUL-padded
    width: int
    expires: array[int]  # 'q'
    profile_of: array[int]  # 'I', index into profiles
    id_order: array[int]  # 'I', rows in ascending id order
    profiles: tuple[Profile, ...]

    def __len__(self) -> int:
        return len(self.expires)

    def digest_at(self, row: int) -> bytes:
        return self.digests[row * DIGEST_SIZE : row * DIGEST_SIZE + DIGEST_SIZE]

    def id_at(self, row: int) -> str:
        w = self.width
        return self.ids[row * w : row * w + w].rstrip(b"\0").decode("ascii")

    def row_of_id(self, key_id: str) -> int:
        """The row of ``key_id``, or -1 (binary search over ``id_order``)."""
        try:
            wanted = key_id.encode("ascii")
        except UnicodeEncodeError:
            return -1
        if not wanted or len(wanted) > self.width:
            return -1
        wanted = wanted.ljust(self.width, b"\0")
        ids, w, order = self.ids, self.width, self.id_order
        lo, hi = 0, len(order)
        while lo < hi:
            mid = (lo + hi) // 2
            row = order[mid]
            if ids[row * w : row * w + w] < wanted:
                lo = mid + 1
            else:
                hi = mid
        if lo < len(order) and ids[order[lo] * w : order[lo] * w + w] == wanted:
            return order[lo]
        return -1

    def message(self, row: int) -> CredentialUpserted:
        """Row ``row`` as the entry it was packed from (expiry with the grace folded in)."""
        p = self.profiles[self.profile_of[row]]
        return CredentialUpserted(
            self.id_at(row),
            self.digest_at(row),
            p.workspace,
            frozenset(p.scopes),
            self.expires[row],
            p.rate_limit,
            p.rate_period,
            p.revoked,
            suspended=p.suspended,
            client_cidrs=p.client_cidrs,
        )

    # -- building ---------------------------------------------------------------------------

    @classmethod
    def pack(cls, messages: Iterable[CredentialUpserted], min_width: int = 1) -> PackedKeys:
        """The table of ``messages``: ``pack_rows`` of their fields."""
        return cls.pack_rows(map(AS_ROW, messages), min_width)

    @classmethod
    def pack_rows(cls, keys: Iterable[KeyRow], min_width: int = 1) -> PackedKeys:
        """The table of ``keys`` (one per key id; the last one of an id wins), ids padded to
        at least ``min_width``. PackError for an id that is not 1 to 255 printable ASCII
        characters, or a digest that is not 32 bytes or appears twice."""
        # Column at a time with C-level iteration (itemgetter, map, compress): a Python loop
        # body per key costs more than the rest of a cold start's per-key work.
        by_id = {k[0]: k for k in keys}
        rows = sorted(by_id.values(), key=_DIGEST)
        ids = list(map(_ID, rows))
        width = max(max(map(len, ids), default=1), min_width)
        digests = b"".join(map(_DIGEST, rows))
        if not set(map(len, map(_DIGEST, rows))) <= {DIGEST_SIZE}:
            raise PackError("packed keys: a digest is not 32 bytes")
        joined = "".join(ids)
        if not (joined.isascii() and joined.isprintable()) or not (
            min(map(len, ids), default=1) > 0 and width <= MAX_ID_WIDTH
        ):
            raise PackError("packed keys: a key id is not 1 to 255 printable ASCII characters")
        # Profiles interned on a plain tuple (a frozenset caches its hash), numbered in order of
        # first use; a Profile is built once per distinct one.
        interned: dict[_ProfileKey, int] = {
            key: i for i, key in enumerate(dict.fromkeys(map(_PROFILE, rows)))
        }
        profile_of = array("I", map(interned.__getitem__, map(_PROFILE, rows)))
        if min(map(len, ids), default=width) == width:  # the usual case: minted ids, one length
            id_block = joined.encode("ascii")
        else:
            id_block = "".join(i.ljust(width, "\0") for i in ids).encode("ascii")
        expires = array("q", map(_EXPIRES, rows))
        for row in compress(range(len(rows)), map(_GRACE, rows)):  # replaced keys only
            expires[row] = min(expires[row], rows[row][8] or expires[row])
        table = cls(
            digests=digests,
            ids=id_block,
            width=width,
            expires=expires,
            profile_of=profile_of,
            id_order=array("I", sorted(range(len(rows)), key=ids.__getitem__)),
            profiles=tuple(
                Profile(ws, tuple(sorted(sc)), rl, rp, cidrs, rv, su)
                for ws, sc, rl, rp, cidrs, rv, su in interned
            ),
        )
        table.check_digests()  # the rest holds by construction
        return table

    def merged(self, drop: Iterable[int], add: Iterable[CredentialUpserted]) -> PackedKeys:
        """This table without the rows in ``drop``, with the keys ``add`` (whose digests and
        ids are not among the rows kept): slices of the columns joined at C speed, so folding a
        few thousand changes into a million rows costs a fraction of packing them anew."""
        extra = PackedKeys.pack(add, self.width)
        if extra.width != self.width:  # a longer id than any before: pad every row anew
            kept = sorted(set(range(len(self))).difference(drop))
            return PackedKeys.pack(
                [*map(self.message, kept), *map(extra.message, range(len(extra)))]
            )
        n, k, w = len(self), len(extra), self.width
        profiles = list(self.profiles)
        index = {p: i for i, p in enumerate(profiles)}
        for p in extra.profiles:
            if p not in index:
                index[p] = len(profiles)
                profiles.append(p)
        extra_profile = [index[p] for p in extra.profiles]
        prefixes = prefix_column(self.digests)
        inserts = [self._position(prefixes, extra.digest_at(j)) for j in range(k)]
        drops = sorted(set(drop))
        digests: list[bytes] = []
        ids: list[bytes] = []
        expires, profile_of = array("q"), array("I")
        new_of_old = array("q", [-1]) * n
        new_of_extra = array("q", [0]) * k
        at = cur = di = ii = 0
        while cur < n or ii < k:
            stop = min(drops[di] if di < len(drops) else n, inserts[ii] if ii < k else n)
            if stop > cur:  # a run of kept rows
                digests.append(self.digests[cur * DIGEST_SIZE : stop * DIGEST_SIZE])
                ids.append(self.ids[cur * w : stop * w])
                expires.extend(self.expires[cur:stop])
                profile_of.extend(self.profile_of[cur:stop])
                new_of_old[cur:stop] = array("q", range(at, at + stop - cur))
                at += stop - cur
                cur = stop
            elif ii < k and inserts[ii] == cur:
                digests.append(extra.digest_at(ii))
                ids.append(extra.ids[ii * w : ii * w + w])
                expires.append(extra.expires[ii])
                profile_of.append(extra_profile[extra.profile_of[ii]])
                new_of_extra[ii] = at
                at += 1
                ii += 1
            else:  # cur is a dropped row
                cur += 1
                di += 1
        id_block = b"".join(ids)
        in_order = array("I", [new_of_old[r] for r in self.id_order if new_of_old[r] >= 0])
        added = array("I", [new_of_extra[j] for j in extra.id_order])
        table = PackedKeys(
            b"".join(digests), id_block, w, expires, profile_of,
            _merge_order(in_order, added, id_block, w),
            tuple(profiles),
        )  # fmt: skip
        table.check_digests()
        return table

    def _position(self, prefixes: array[int], digest: bytes) -> int:
        """Where ``digest`` goes among the rows (before the first larger one)."""
        prefix = int.from_bytes(digest[:8], "big")
        at = bisect_left(prefixes, prefix)
        while at < len(self) and prefixes[at] == prefix and self.digest_at(at) < digest:
            at += 1
        return at

    # -- the binary form ----------------------------------------------------------------------

    def encode(self) -> bytes:
        return b"".join(self.encoded_parts())

    def encoded_parts(self) -> list[bytes]:
        """``encode``'s bytes in pieces (the digests and ids are the table's own bytes, not
        copies): a writer that takes them one by one never holds the table twice."""
        profiles = json.dumps([p.to_json() for p in self.profiles], separators=(",", ":"))
        raw = profiles.encode()
        head = _HEADER.pack(MAGIC, VERSION, self.width, len(self), len(raw))
        return [
            head,
            raw,
            self.digests,
            self.ids,
            _le(self.expires),
            _le(self.profile_of),
            _le(self.id_order),
        ]

    @classmethod
    def decode(cls, data: bytes | memoryview) -> PackedKeys:
        """The table in ``data`` (exactly one, nothing after it); PackError otherwise."""
        return cls.decode_chunks([data])

    @classmethod
    def decode_chunks(cls, chunks: list[bytes | memoryview]) -> PackedKeys:
        """``decode`` of the bytes of ``chunks`` one after the other (a snapshot's pieces as
        they arrived), emptying the list: each column is copied out of the chunks it spans and
        those are dropped, so the table is never held whole twice (gathering it first into one
        buffer did: ≈ 64 MB of a 1M-key sidecar's peak)."""
        source = _Chunks(chunks)
        if source.size < _HEADER.size:
            raise PackError("packed keys: truncated header")
        magic, version, width, rows, plen = _HEADER.unpack(source.take(_HEADER.size))
        if magic != MAGIC:
            raise PackError("packed keys: not a packed key table")
        if version != VERSION:
            raise PackError(f"packed keys: version {version}, this sidecar reads {VERSION}")
        if not 0 < width <= MAX_ID_WIDTH:
            raise PackError(f"packed keys: id width {width}")
        sizes = (plen, rows * DIGEST_SIZE, rows * width, rows * 8, rows * 4, rows * 4)
        if source.size != _HEADER.size + sum(sizes):
            raise PackError(
                f"packed keys: {source.size} bytes for {rows} rows "
                f"(want {_HEADER.size + sum(sizes)}): truncated or trailing data"
            )
        try:
            raw = json.loads(source.take(plen))
        except ValueError as exc:
            raise PackError(f"packed keys: unreadable profiles: {exc}") from None
        if not isinstance(raw, list):
            raise PackError("packed keys: profiles are not a list")
        table = cls(
            digests=source.take(sizes[1]),
            ids=source.take(sizes[2]),
            width=width,
            expires=_from_le("q", source.take(sizes[3])),
            profile_of=_from_le("I", source.take(sizes[4])),
            id_order=_from_le("I", source.take(sizes[5])),
            profiles=tuple(Profile.from_json(p) for p in raw),
        )
        table.check()
        return table

    def check(self) -> None:
        """Every invariant a lookup relies on; PackError naming the first one broken."""
        n = len(self)
        if self.profile_of and max(self.profile_of) >= len(self.profiles):
            raise PackError("packed keys: a profile index is out of range")
        if not self.ids.isascii():
            raise PackError("packed keys: a key id is not ASCII")
        self.check_digests()
        if len(self.id_order) != n or (n and max(self.id_order) >= n):
            raise PackError("packed keys: the id order is not a permutation of the rows")
        # In C where it is built: this loop was 1.2 s of a sidecar's 1M-key load.
        ascending = _native.ids_ascending(self.ids, self.width, self.id_order) if _native else None
        if ascending is None:  # not built, or arguments that are not a table's
            ascending = ids_ascending(self.ids, self.width, self.id_order)
        if not ascending:
            raise PackError("packed keys: key ids are empty, padded wrongly or out of order")

    def check_digests(self) -> None:
        """The digests are strictly ascending (so each appears once)."""
        prefixes = prefix_column(self.digests)
        if all(map(operator.lt, prefixes, islice(prefixes, 1, None))):
            return
        if not all(map(operator.le, prefixes, islice(prefixes, 1, None))):
            raise PackError("packed keys: digests are not sorted")
        for row in range(len(self) - 1):  # equal 8-byte prefixes (rare): whole digests decide
            if prefixes[row] == prefixes[row + 1] and not (
                self.digest_at(row) < self.digest_at(row + 1)
            ):
                raise PackError("packed keys: a digest appears twice")


def ids_ascending(ids: bytes, w: int, id_order: array[int]) -> bool:
    """Whether the ids in ``id_order`` (rows of ``ids``, ``w`` bytes each) are each non-empty,
    NUL-padded only at the end, and strictly ascending (sidecar/core/_packing.c's
    ``ids_ascending`` is this loop compiled)."""
    previous = b""
    for row in id_order:
        key_id = ids[row * w : row * w + w]
        stripped = key_id.rstrip(b"\0")
        if not stripped or b"\0" in stripped or not key_id > previous:
            return False
        previous = key_id
    return True


def _merge_order(kept: array[int], added: array[int], ids: bytes, w: int) -> array[int]:
    """Rows ``kept`` and ``added`` (each in ascending id order, no id in both) as one list in
    ascending id order. Each added id is placed by a bisection over every 32nd kept id (a short
    list of bytes, compared in C), then over at most 32 rows; the kept rows between go over
    as array slices. Linear in the rows: inserting into a list one by one moved the whole
    list each time (quadratic: a fold of n/8 keys into a million rows would take minutes)."""

    def id_at(row: int) -> bytes:
        return ids[row * w : row * w + w]

    step = 32
    sample = [id_at(kept[i]) for i in range(0, len(kept), step)]
    out = array("I")
    done = 0
    for row in added:
        wanted = id_at(row)
        c = bisect_left(sample, wanted)
        at = bisect_left(kept, wanted, max(done, (c - 1) * step), min(len(kept), c * step),
                         key=id_at)  # fmt: skip
        out += kept[done:at]
        out.append(row)
        done = at
    out += kept[done:]
    return out


def prefix_column(digests: bytes) -> array[int]:
    """The first 8 bytes of every digest as a big-endian uint64 (so they sort as the digests
    do), sliced out at C speed."""
    column = array("Q")
    if digests:
        column.frombytes(memoryview(digests).cast("Q")[:: DIGEST_SIZE // 8].tobytes())
        if _LITTLE:
            column.byteswap()
    return column


class _Chunks:
    """Bytes in pieces, taken from the front; a piece is let go once taken whole."""

    def __init__(self, chunks: list[bytes | memoryview]) -> None:
        self._chunks = deque(memoryview(c).cast("B") for c in chunks if len(c))
        chunks.clear()  # the caller's list no longer holds them
        self.size = sum(map(len, self._chunks))

    def take(self, n: int) -> bytes:
        """The next ``n`` bytes (the caller checked that there are as many)."""
        pieces: list[memoryview] = []
        while n > 0:
            head = self._chunks[0]
            if len(head) <= n:
                pieces.append(self._chunks.popleft())
                n -= len(head)
            else:
                pieces.append(head[:n])
                self._chunks[0] = head[n:]
                n = 0
        return b"".join(pieces)


def _le(column: array[int]) -> bytes:
    if _LITTLE:
        return column.tobytes()
    swapped = array(column.typecode, column)  # pragma: no cover - big-endian hosts
    swapped.byteswap()  # pragma: no cover
    return swapped.tobytes()  # pragma: no cover


def _from_le(code: str, raw: bytes | memoryview) -> array[int]:
    column = array(code)
    column.frombytes(raw)
    if not _LITTLE:  # pragma: no cover - big-endian hosts
        column.byteswap()
    return column
