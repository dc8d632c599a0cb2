"""A packed key table made ready for lookups: an index over the digests and the shared parts of
each profile, so a lookup builds a ``Credential`` from a row without per-key Python objects
kept between lookups.

The index: the digests' first 8 bytes as one ``array('Q')`` (big-endian, so they sort as the
digests do) and bucket starts over their top bits (about four rows a bucket), so a lookup is two
array reads, a ``bisect`` over a handful of rows and ``hmac.compare_digest`` on the whole
digest."""

from __future__ import annotations

import hmac
from array import array
from bisect import bisect_left
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_network

from sidecar.authz.decision import Identity
from sidecar.core.packed import DIGEST_SIZE, PackedKeys, Profile, prefix_column

KIND = "api_key"


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

    __slots__ = ("packed", "prefixes", "shared", "shift", "starts")

    def __init__(self, packed: PackedKeys) -> None:
        self.packed = packed
        self.prefixes = prefix_column(packed.digests)
        n = len(packed)
        bits = max(0, min(24, n.bit_length() - 3))
        self.shift = 64 - bits
        prefixes, shift = self.prefixes, self.shift
        self.starts = array("I", (bisect_left(prefixes, b << shift) for b in range(1 << bits)))
        self.starts.append(n)
        self.shared = [Shared.of(p) for p in packed.profiles]

    @classmethod
    def empty(cls) -> KeyTable:
        return cls(PackedKeys.pack(()))

    def __len__(self) -> int:
        return len(self.packed)

    def row(self, digest: bytes) -> int:
        """The row of ``digest``, or -1."""
        if len(digest) != DIGEST_SIZE:
            return -1
        prefix = int.from_bytes(digest[:8], "big")
        bucket = prefix >> self.shift
        hi = self.starts[bucket + 1]
        prefixes = self.prefixes
        i = bisect_left(prefixes, prefix, self.starts[bucket], hi)
        digests = self.packed.digests
        while i < hi and prefixes[i] == prefix:
            at = i * DIGEST_SIZE
            if hmac.compare_digest(digests[at : at + DIGEST_SIZE], digest):
                return i
            i += 1
        return -1

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
