"""The sidecar's local replica of credential state: digests of usable API keys, token signing keys,
revoked grants and token ids. It is fed by change-log entries (a snapshot, then ordered changes)
and read on every check without locks.

The API keys are dense (docs/performance.md, "Replica size"): a packed key table from the last
snapshot (``keytable``: sorted digests, per-key columns, profiles shared between keys) and a small
overlay dict of what changed since (digest -> Credential, or None for a key gone), folded into a
new table once it grows past an eighth of the table. The fold runs on its own thread (``FoldJob``,
docs/performance.md "Folding off the sync thread"): it merges a copy of the overlay into a new
table without the lock, then swaps it in under the lock with every change that arrived meanwhile
carried over, so a revocation applied during a fold is effective at once and stays so. Writers
(the sync thread, the housekeeping prune, the fold's swap) take ``_lock``; readers never do: they
see one ``_Keys`` at a time, whose overlay only gains or replaces entries, and a writer swaps in a
copy of the lookup cache without the changed keys *after* each change, so a credential built
before the change is never kept while the keys in use stay cached (clearing it on every change
made every key in use rebuild its credential, 3 to 12 µs each, after every revocation anywhere
in the fleet)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from ipaddress import ip_network
from typing import Any, Final

from sidecar.authz.decision import Identity
from sidecar.authz.keytable import Credential, KeyTable
from sidecar.core import changes
from sidecar.core.models import Change
from sidecar.core.packed import PackedKeys, PackError

log = logging.getLogger("sidecar.replica")

__all__ = ["Credential", "Replica", "ReplicaError"]

# Credentials built from table rows, kept for the keys in use (a change drops its own keys).
CACHE_SIZE = 8192
# The overlay is folded into a new table when it holds more than this many entries, or more
# than an eighth of the table's rows.
COMPACT_MIN = 4096
_ABSENT: Final = Credential(Identity("", "", "", frozenset(), 0))


class ReplicaError(ValueError):
    """A change could not be applied (malformed payload or revision out of order)."""


class _Keys:
    """The API keys at one moment: a table, the overlay of later changes, and the lookup cache."""

    __slots__ = ("cache", "overlay", "overlay_ids", "table", "touched")

    def __init__(self, table: KeyTable) -> None:
        self.table = table
        self.overlay: dict[bytes, Credential | None] = {}
        self.overlay_ids: dict[str, bytes] = {}  # key id -> digest, for the overlay's keys
        self.cache: dict[bytes, Credential] = {}
        # While a fold is under way: the digests changed since it copied the overlay (the
        # changes it does not include, carried over when it swaps its table in).
        self.touched: set[bytes] | None = None

    def put(self, digest: bytes, cred: Credential) -> None:
        self.overlay[digest] = cred
        if self.touched is not None:
            self.touched.add(digest)

    def current(self, digest: bytes) -> Credential | None:
        cred = self.overlay.get(digest, _ABSENT)
        if cred is _ABSENT:
            row = self.table.row(digest)
            return None if row < 0 else self.table.credential_at(row)
        return cred

    def locate(self, key_id: str) -> bytes | None:
        """The digest key ``key_id`` was last known by."""
        digest = self.overlay_ids.get(key_id)
        if digest is not None:
            return digest
        row = self.table.packed.row_of_id(key_id)
        return None if row < 0 else self.table.packed.digest_at(row)

    def forget(self, *digests: bytes) -> None:
        """Swap in a copy of the cache without ``digests`` (after the change is in the overlay:
        a reader still holding the old cache may add a stale entry to it, never to this one)."""
        cache = dict(self.cache)  # one C call under the GIL: readers' inserts cannot interleave
        for digest in digests:
            cache.pop(digest, None)
        self.cache = cache

    def hide(self, digest: bytes) -> None:
        if self.table.row(digest) >= 0:
            self.overlay[digest] = None
        else:
            self.overlay.pop(digest, None)
        if self.touched is not None:
            self.touched.add(digest)

    def shadowed_rows(self) -> set[int]:
        return {row for row in map(self.table.row, self.overlay) if row >= 0}

    def messages(self, drop: Iterable[int] = ()) -> Iterator[changes.CredentialUpserted]:
        """Every key as its entry: the table's rows the overlay leaves, then the overlay's."""
        skip = self.shadowed_rows().union(drop)
        packed = self.table.packed
        for row in range(len(packed)):
            if row not in skip:
                yield packed.message(row)
        for digest, cred in self.overlay.items():
            if cred is not None:
                yield message_of(digest, cred)

    def __len__(self) -> int:
        n = len(self.table)
        for digest, cred in self.overlay.items():
            in_table = self.table.row(digest) >= 0
            n += (cred is not None) - in_table
        return n

    def __iter__(self) -> Iterator[bytes]:
        skip = self.shadowed_rows()
        packed = self.table.packed
        for row in range(len(packed)):
            if row not in skip:
                yield packed.digest_at(row)
        yield from (d for d, cred in self.overlay.items() if cred is not None)


def message_of(digest: bytes, cred: Credential) -> changes.CredentialUpserted:
    ident = cred.identity
    return changes.CredentialUpserted(
        ident.id,
        digest,
        ident.workspace,
        ident.scopes,
        int(ident.expires_at),
        ident.rate_limit,
        ident.rate_period,
        cred.revoked,
        suspended=cred.suspended,
        client_cidrs=tuple(str(n) for n in ident.networks),
    )


def credential_of(m: changes.CredentialUpserted) -> Credential:
    identity = Identity(
        kind="api_key",
        id=m.id,
        workspace=m.workspace,
        scopes=m.scopes,
        # A replaced key's grace deadline ends it like an expiry, enforced here.
        expires_at=min(m.expires_at, m.grace_deadline or m.expires_at),
        rate_limit=m.rate_limit,
        rate_period=m.rate_period,
        networks=tuple(ip_network(c) for c in m.client_cidrs),
    )
    return Credential(identity, revoked=m.revoked, suspended=m.suspended)


class FoldJob:
    """One fold of the overlay into a new table: ``build`` merges, without the replica's lock,
    the table and the copy of the overlay taken when the fold began; ``install`` swaps the new
    table in under the lock, with the changes since that copy (``_Keys.touched``) carried over
    into its overlay. A fold whose replica has since swapped in another table (a snapshot) is
    dropped: its table would be older than what it replaces."""

    def __init__(self, replica: Replica, keys: _Keys) -> None:
        self._replica = replica
        self._keys = keys
        self._overlay = dict(keys.overlay)  # one C call: the overlay as of now
        self.table: KeyTable | None = None
        keys.touched = set()

    def build(self) -> None:
        base = self._keys.table
        gone = {row for row in map(base.row, self._overlay) if row >= 0}
        added = [message_of(d, cred) for d, cred in self._overlay.items() if cred is not None]
        try:
            self.table = _table(lambda: base.packed.merged(gone, added))
        except ReplicaError:
            log.exception("folding the overlay failed; the overlay is kept")

    def install(self) -> bool:
        """Swap the built table in; False when the fold was dropped."""
        return self._replica._install_fold(self)

    def __call__(self) -> None:
        try:
            self.build()
        finally:
            self.install()


def _fold_in_thread(job: FoldJob) -> None:
    threading.Thread(target=job, name="spauth-replica-fold", daemon=True).start()


FoldRunner = Callable[[FoldJob], None]


class CredentialView(Mapping[bytes, Credential]):
    """``replica.by_digest``: the usable API keys as a read-only mapping, digest -> Credential
    (for tools and tests; the check path calls ``Replica.credential``)."""

    def __init__(self, replica: Replica) -> None:
        self._replica = replica

    def __getitem__(self, digest: bytes) -> Credential:
        cred = self._replica.credential(digest)
        if cred is None:
            raise KeyError(digest)
        return cred

    def __iter__(self) -> Iterator[bytes]:
        with self._replica._lock:  # the overlay must not change while it is walked
            return iter(list(self._replica._keys))

    def __len__(self) -> int:
        with self._replica._lock:
            return len(self._replica._keys)


class Replica:
    """Credential state as of ``revision``."""

    def __init__(self, fold_runner: FoldRunner = _fold_in_thread) -> None:
        self.revision = 0
        # The change log ``revision`` counts in (the control plane's store); '' when unknown.
        self.log_id = ""
        self.loaded = False
        self._keys = _Keys(KeyTable.empty())
        self.signing_keys: dict[str, dict[str, Any]] = {}
        self.revoked_grants: dict[str, float] = {}
        self.revoked_jtis: dict[str, float] = {}
        self.last_contact = 0.0
        # Changes of a kind this version does not know, by kind, since the process started
        # (reported in health and metrics, never applied).
        self.unknown_kinds: dict[str, int] = {}
        self.compactions = 0
        self.folds_dropped = 0
        # Runs a FoldJob: on its own thread (tests run it step by step).
        self._fold_runner = fold_runner
        self._fold: FoldJob | None = None  # the fold under way
        self._lock = threading.RLock()

    # -- reads (hot path) --------------------------------------------------------------------

    def credential(self, digest: bytes) -> Credential | None:
        keys = self._keys
        cache = keys.cache  # taken before the overlay: see the module's docstring
        cred = cache.get(digest)
        if cred is None:
            cred = keys.overlay.get(digest, _ABSENT)
            if cred is _ABSENT:
                table = keys.table
                row = table.row(digest)
                if row < 0:
                    return None
                cred = table.credential_at(row)
            if cred is not None and len(cache) < CACHE_SIZE:
                cache[digest] = cred
        return cred

    @property
    def by_digest(self) -> CredentialView:
        return CredentialView(self)

    @property
    def table(self) -> KeyTable:
        """The packed key table of the last snapshot or compaction (without the overlay)."""
        return self._keys.table

    @property
    def overlay_size(self) -> int:
        return len(self._keys.overlay)

    # -- writes (under _lock) -------------------------------------------------------------------

    def load_snapshot(self, revision: int, entries: list[Change], log_id: str = "") -> None:
        """Replace the whole state with ``entries`` as of ``revision`` of change log
        ``log_id`` (the snapshot of a control plane that sends no packed key table, and the
        replica file of the previous format)."""
        fresh = Replica()
        pending: dict[str, changes.CredentialUpserted] = {}
        for entry in entries:
            message = fresh._parse(entry)
            if isinstance(message, changes.CredentialUpserted):
                pending[message.id] = message
            elif isinstance(message, changes.CredentialRevoked):
                if message.id in pending:
                    # A tombstone keeps the identity, so the denial can say "revoked".
                    pending[message.id] = replace(
                        pending[message.id], revoked=True, suspended=False
                    )
            elif message is not None:
                _APPLY[type(message)](fresh, message)
        fresh._keys = _Keys(_table(lambda: PackedKeys.pack(pending.values())))
        self._install(fresh, revision, log_id)

    def load_packed(
        self, revision: int, packed: PackedKeys, entries: list[Change], log_id: str = ""
    ) -> None:
        """Replace the whole state with the key table ``packed`` and the other ``entries``."""
        fresh = Replica()
        fresh._keys = _Keys(_table(lambda: packed))
        for entry in entries:
            fresh._apply(entry)
        self._install(fresh, revision, log_id)

    def _install(self, fresh: Replica, revision: int, log_id: str) -> None:
        with self._lock:
            # Swap attribute by attribute: each read sees a consistent table or dict.
            self._keys = fresh._keys
            self.signing_keys = fresh.signing_keys
            self.revoked_grants = fresh.revoked_grants
            self.revoked_jtis = fresh.revoked_jtis
            for kind, count in fresh.unknown_kinds.items():
                self.unknown_kinds[kind] = self.unknown_kinds.get(kind, 0) + count
            self.revision = revision
            self.log_id = log_id
            self.loaded = True

    def apply(self, change: Change) -> None:
        """Apply one change; its revision must follow the current one. A fold it makes due
        runs on its own thread: the next change does not wait for it."""
        with self._lock:
            if change.revision <= self.revision:
                return  # already applied (at-least-once delivery)
            self._apply(change)
            self.revision = change.revision
            keys = self._keys
            due = len(keys.overlay) > max(COMPACT_MIN, len(keys.table) // 8)
            job = self._begin_fold() if due else None
        if job is not None:
            self._run_fold(job)

    def fold(self) -> bool:
        """Start folding the overlay into a new table (on the fold runner); False when a fold
        is under way already or there is nothing to fold."""
        with self._lock:
            job = self._begin_fold() if self._keys.overlay else None
        if job is not None:
            self._run_fold(job)
        return job is not None

    def _begin_fold(self) -> FoldJob | None:
        if self._fold is not None:
            return None
        self._fold = FoldJob(self, self._keys)
        return self._fold

    def _run_fold(self, job: FoldJob) -> None:
        try:
            self._fold_runner(job)
        except BaseException:
            with self._lock:  # never started (a thread at interpreter exit): let another try
                job._keys.touched = None
                if self._fold is job:
                    self._fold = None
            raise

    def _install_fold(self, job: FoldJob) -> bool:
        with self._lock:
            keys = job._keys
            touched, keys.touched = keys.touched or set(), None
            if self._fold is job:
                self._fold = None
            table = job.table
            if table is None or self._keys is not keys:
                self.folds_dropped += 1
                return False
            fresh = _Keys(table)
            for digest in touched:  # the changes since the fold's copy, onto the new table
                cred = keys.overlay.get(digest)
                if cred is not None:
                    fresh.overlay[digest] = cred
                    if keys.overlay_ids.get(cred.id) == digest:
                        fresh.overlay_ids[cred.id] = digest
                elif table.row(digest) >= 0:
                    fresh.overlay[digest] = None
            # The cache answers as the old keys did, and the new ones answer the same (each
            # change since the copy dropped its own keys from it, as always).
            fresh.cache = dict(keys.cache)
            self._keys = fresh
            self.compactions += 1
            return True

    def _parse(self, change: Change) -> changes.Message | None:
        try:
            return changes.parse(change)
        except changes.UnknownChangeKind as exc:
            # Not a silent skip: counted, logged and reported in health and metrics. The rest
            # of the log still applies (its revisions must not stall behind it).
            self.unknown_kinds[exc.kind[:64]] = self.unknown_kinds.get(exc.kind[:64], 0) + 1
            log.error(
                "change of unknown kind not applied",
                extra={"kind": exc.kind[:64], "revision": change.revision},
            )
            return None
        except changes.MalformedChange as exc:
            raise ReplicaError(str(exc)) from exc

    def _apply(self, change: Change) -> None:
        message = self._parse(change)
        if message is None:
            return
        try:
            _APPLY[type(message)](self, message)
        except (KeyError, TypeError, ValueError) as exc:
            raise ReplicaError(f"bad {change.kind} payload at revision {change.revision}") from exc

    def _upsert_credential(self, m: changes.CredentialUpserted) -> None:
        keys = self._keys
        cred = credential_of(m)
        old = keys.locate(m.id)
        if old is not None and old != m.digest:
            keys.hide(old)
        keys.put(m.digest, cred)
        keys.overlay_ids[m.id] = m.digest
        keys.forget(m.digest, old or m.digest)

    def _revoke_credential(self, m: changes.CredentialRevoked) -> None:
        keys = self._keys
        digest = keys.locate(m.id)
        if digest is None:
            return
        cred = keys.current(digest)
        if cred is not None:
            # Keep a tombstone so the denial can say "revoked" rather than "unknown".
            keys.put(digest, Credential(cred.identity, revoked=True))
            keys.forget(digest)

    def _expire_credential(self, m: changes.CredentialExpired) -> None:
        # Expiry is evaluated against the clock at every check; nothing to change here.
        return None

    def _upsert_signing_key(self, m: changes.SigningKeyUpserted) -> None:
        self.signing_keys[m.kid] = m.change().payload

    def _retire_signing_key(self, m: changes.SigningKeyRetired) -> None:
        self.signing_keys.pop(m.kid, None)

    def _revoke_grant(self, m: changes.GrantRevoked) -> None:
        self.revoked_grants[m.grant_id] = m.expires_at

    def _revoke_jti(self, m: changes.TokenRevoked) -> None:
        self.revoked_jtis[m.jti] = m.expires_at

    def prune(self, now: float, margin: float = 86400) -> int:
        """Forget credentials and revocations that expired more than ``margin`` ago (the
        table's rows are hidden in the overlay, and leave the table at the next fold)."""
        removed = 0
        with self._lock:
            keys = self._keys
            for digest, cred in list(keys.overlay.items()):
                if cred is not None and cred.expires_at + margin < now:
                    keys.hide(digest)
                    keys.overlay_ids.pop(cred.id, None)
                    removed += 1
            packed = keys.table.packed
            if len(packed) and min(packed.expires) + margin < now:
                overlay = keys.overlay
                for row, expiry in enumerate(packed.expires):
                    if expiry + margin < now:
                        digest = packed.digest_at(row)
                        if digest not in overlay:
                            keys.hide(digest)
                            removed += 1
            if removed:
                keys.cache = {}
            for table in (self.revoked_grants, self.revoked_jtis):
                for key, until in list(table.items()):
                    if until and until + margin < now:
                        table.pop(key, None)
                        removed += 1
            due = len(keys.overlay) > max(COMPACT_MIN, len(keys.table) // 8)
            job = self._begin_fold() if due else None
        if job is not None:
            self._run_fold(job)
        return removed

    # -- persistence ----------------------------------------------------------------------------

    def entries(self) -> list[Change]:
        """The state as change entries (the snapshot format of a control plane that sends no
        packed key table)."""
        out = [m.change() for m in self._keys.messages()]
        out.extend(self.other_entries())
        return out

    def other_entries(self) -> list[Change]:
        """Everything but the API keys, as change entries."""
        out = [changes.SigningKeyUpserted.parse(v).change() for v in self.signing_keys.values()]
        out.extend(changes.GrantRevoked(g, t).change() for g, t in self.revoked_grants.items())
        out.extend(changes.TokenRevoked(j, t).change() for j, t in self.revoked_jtis.items())
        return out

    def dumps(self) -> bytes:
        """The replica file's bytes (``replica_file``: digests and public keys only)."""
        from sidecar.authz import replica_file

        with self._lock:
            return replica_file.encode(self)

    def dump_parts(self) -> list[bytes]:
        """``dumps`` in pieces, for a writer that takes them one by one."""
        from sidecar.authz import replica_file

        with self._lock:
            return replica_file.encoded_parts(self)

    def loads(self, data: bytes) -> None:
        """Restore state written by ``dumps``, or by the JSON format before it."""
        from sidecar.authz import replica_file

        replica_file.decode(self, data)


def _table(build: Callable[[], PackedKeys]) -> KeyTable:
    try:
        return KeyTable(build())
    except (PackError, ValueError) as exc:
        raise ReplicaError(f"bad key table: {exc}") from exc


_APPLY: dict[type[changes.Message], Callable[[Replica, Any], None]] = {
    changes.CredentialUpserted: Replica._upsert_credential,
    changes.CredentialRevoked: Replica._revoke_credential,
    changes.CredentialExpired: Replica._expire_credential,
    changes.SigningKeyUpserted: Replica._upsert_signing_key,
    changes.SigningKeyRetired: Replica._retire_signing_key,
    changes.GrantRevoked: Replica._revoke_grant,
    changes.TokenRevoked: Replica._revoke_jti,
}
