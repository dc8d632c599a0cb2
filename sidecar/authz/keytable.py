"""A packed key table made ready for lookups: an index over the digests and the shared parts of
each profile, so a lookup builds a ``Credential`` from a row without per-key Python objects
kept between lookups.

The index: bucket starts over the digests' top bits (about two rows a bucket, 4 bytes a key),
so a lookup is two array reads and one ``bytes.find`` over the bucket's rows."""

from __future__ import annotations

from array import array
from bisect import bisect_left
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_network

from sidecar.authz.decision import Identity
from sidecar.core.native import optional_module
from sidecar.core.packed import DIGEST_SIZE, PackedKeys, Profile, prefix_column

KIND = "api_key"
_native, _ = optional_module("sidecar.core._packing")


@dataclass(frozen=True, slots=True)
class Credential:
    """A replicated API key: its digest is the lookup key, never the secret."""

    identity: Identity
    revoked: bool = False
    suspended: bool = False

    @property
    def id(self) -> str:
        return self.identity.id

    @property
    def expires_at(self) -> float:
        return self.identity.expires_at


@dataclass(frozen=True, slots=True)
class Shared:
    """One profile's parts, built once and shared by every key of that profile (the same
    workspace string, scope set and parsed networks objects)."""

    workspace: str
    scopes: frozenset[str]
    rate_limit: int
    rate_period: int
    networks: tuple[IPv4Network | IPv6Network, ...]
    revoked: bool
    suspended: bool

    @classmethod
    def of(cls, p: Profile) -> Shared:
        return cls(
            p.workspace,
            frozenset(p.scopes),
            p.rate_limit,
            p.rate_period,
            tuple(ip_network(c) for c in p.client_cidrs),  # ValueError for a bad one
            p.revoked,
            p.suspended,
        )


class KeyTable:
    """Lookups over one immutable ``PackedKeys``."""

    __slots__ = ("packed", "shared", "shift", "starts")

    def __init__(self, packed: PackedKeys) -> None:
        self.packed = packed
        n = len(packed)
        # About two rows a bucket: the bucket of a digest is its top ``bits`` bits (at most
        # 24, so the first three bytes hold them).
        bits = max(0, min(24, n.bit_length() - 1))
        self.shift = 24 - bits
        self.starts = bucket_starts(packed.digests, bits)
        self.shared = [Shared.of(p) for p in packed.profiles]

    @classmethod
    def empty(cls) -> KeyTable:
        return cls(PackedKeys.pack(()))

    def __len__(self) -> int:
        return len(self.packed)

    def row(self, digest: bytes) -> int:
        """The row of ``digest``, or -1: ``bytes.find`` over the rows of its bucket (one C
        call; a digest is the SHA-256 of a 190-bit secret, so how long a miss takes tells
        nothing usable, as with the dict this replaced)."""
        if len(digest) != DIGEST_SIZE:
            return -1
        bucket = int.from_bytes(digest[:3], "big") >> self.shift
        starts = self.starts
        end = starts[bucket + 1] * DIGEST_SIZE
        at = self.packed.digests.find(digest, starts[bucket] * DIGEST_SIZE, end)
        while at > 0 and at % DIGEST_SIZE:  # a match across two digests (never in practice)
            at = self.packed.digests.find(digest, at + 1, end)
        return at // DIGEST_SIZE if at >= 0 else -1

    def credential_at(self, row: int) -> Credential:
        packed = self.packed
        s = self.shared[packed.profile_of[row]]
        identity = Identity(
            KIND,
            packed.id_at(row),
            s.workspace,
            s.scopes,
            packed.expires[row],
            rate_limit=s.rate_limit,
            rate_period=s.rate_period,
            networks=s.networks,
        )
        return Credential(identity, s.revoked, s.suspended)


def bucket_starts(digests: bytes, bits: int) -> array[int]:
    """For each of the ``2**bits`` buckets (a digest's top ``bits`` bits), the first row of
    the sorted ``digests`` in it or after it, then the row count (in C where it is built: one
    pass instead of a bisection per bucket, 0.4 s of a 1M-key load)."""
    starts = array("I")
    raw = _native.bucket_starts(digests, bits) if _native is not None else None
    if raw is not None:
        starts.frombytes(raw)
        return starts
    prefixes = prefix_column(digests)
    top = 64 - bits
    starts.extend(bisect_left(prefixes, b << top) for b in range(1 << bits))
    starts.append(len(prefixes))
    return starts
