"""The packed snapshot a control plane serves to sidecars: built once and shared by every sidecar
of a rollout, kept on disk for the next start (snapshot_file.py), refreshed in the background.

A packed snapshot is served while the change log has grown by at most REUSE_CHANGES since it, so
a rollout of many sidecars costs the control plane one build, not one each; one older than
REUSE_SECONDS (or half of REUSE_CHANGES behind) is still served while a new one is built in the
background. The changes committed after it travel inside every snapshot served from it (applied
before the sidecar swaps it in, so a key revoked since is never usable again, not even for a
moment), and the snapshot's revision is the last of them. The same holds for the snapshot read
from disk after a restart, which is used only when it is still good for the store."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sidecar.core.clock import Clock
from sidecar.core.errors import Unavailable
from sidecar.core.models import Change
from sidecar.core.packed import PackedKeys, PackError
from sidecar.core.storage import KeyRow, Store, UnitOfWork
from sidecar.replication.snapshot_file import PackedSnapshot, SnapshotFile, anchor_of

log = logging.getLogger("sidecar.replication")

REUSE_CHANGES = 10_000
REUSE_SECONDS = 300.0

# The store read in one transaction: head revision, the fingerprint of its entry, the keys (as
# rows, or packed already: sidecar/replication/packing.py) and every other entry.
SnapshotRead = Callable[[], tuple[int, str, list[KeyRow] | PackedKeys, list[Change]]]


class PackedSnapshots:
    """The packed snapshot at hand, and when it was built or read."""

    def __init__(
        self, store: Store, clock: Clock, read: SnapshotRead, log_id: Callable[[], str],
        path: Path | None = None,
    ) -> None:  # fmt: skip
        self._store = store
        self._clock = clock
        self._read = read
        self._log_id = log_id
        self._file = SnapshotFile(path) if path is not None else None
        self._built: tuple[PackedSnapshot, float] | None = None  # and when it was built
        self._build_lock = threading.Lock()  # one build at a time; the others wait and share it
        self._file_tried = False
        self.builds = 0
        self.from_file = 0
        self.refreshing = False  # a background build is under way
        # True once ``prepare`` has the snapshot at hand (the control plane is ready only then).
        self.ready = False

    def prepare(self) -> None:
        """Have the packed snapshot at hand before the control plane reports ready: the one
        kept on disk when it is still good for this store, else one built from the store now
        (and kept on disk for the next start). A control plane that starts then serves its
        first sidecars at once, instead of reading and packing every key on their first
        Subscribe while its start-up sweeps run on the same cores."""
        self.current()
        self.ready = True

    def current(self) -> PackedSnapshot | None:
        """The packed snapshot to serve (None: the keys cannot be packed): the one at hand
        while it is at most REUSE_CHANGES behind (refreshed in the background once it is
        old, see ``refresh``), else one built now."""
        built: PackedSnapshot | None = None
        with self._build_lock:
            if self._built is None and not self._file_tried:
                self._file_tried = True  # whoever comes first: prepare() or a Subscribe
                self._read_file()
            if self._built is not None:
                with self._store.read() as uow:
                    head = uow.changes.head()
                # Never one ahead of the log (a database restored under a running control plane).
                if 0 <= head - self._built[0].revision <= REUSE_CHANGES:
                    if self._due(head) and not self.refreshing:
                        self.refreshing = True
                        threading.Thread(target=self._refresh, daemon=True).start()
                    return self._built[0]
            built = self._rebuild()
        self._keep(built)
        return built

    def _read_file(self) -> None:
        """Take the snapshot kept on disk when it is still good for the store (under
        ``_build_lock``)."""
        snap = self._file.load() if self._file is not None else None
        if snap is not None and self._usable(snap):
            self._built = (snap, self._clock.now())
            self.from_file += 1
            log.info("packed snapshot read from its file", extra={"revision": snap.revision})

    def refresh(self) -> bool:
        """Build the packed snapshot again when it is due (older than REUSE_SECONDS with
        changes since, or half of REUSE_CHANGES behind), without holding sidecars back: they
        are served the one at hand meanwhile. The control plane's sweeper calls it, so the
        next sidecar and the next start (the file) find a recent one."""
        with self._build_lock:
            if self.refreshing:
                return False
            with self._store.read() as uow:
                head = uow.changes.head()
            if not self._due(head):
                return False
            self.refreshing = True
        return self._refresh()

    def _due(self, head: int) -> bool:
        if self._built is None:
            return False
        snap, at = self._built
        behind = head - snap.revision
        aged = self._clock.now() - at > REUSE_SECONDS
        return behind > REUSE_CHANGES // 2 or (behind > 0 and aged)

    def _refresh(self) -> bool:
        """Build outside ``_build_lock`` and swap the result in (``_refreshing`` is set)."""
        try:
            snap = self._build()
            if snap is None:
                return False
            with self._build_lock:
                if self._built is None or self._built[0].revision < snap.revision:
                    self._built = (snap, self._clock.now())
            self._keep(snap)
            return True
        except Unavailable as exc:
            log.warning("snapshot refresh: store unavailable", extra={"error": exc.message})
            return False
        finally:
            self.refreshing = False

    def _rebuild(self) -> PackedSnapshot | None:
        """Build the packed snapshot from the store now (under ``_build_lock``)."""
        snap = self._build()
        self._built = (snap, self._clock.now()) if snap is not None else None
        return snap

    def _build(self) -> PackedSnapshot | None:
        started, cpu = time.perf_counter(), time.thread_time()
        try:
            head, anchor, keys, entries = self._read()  # may pack the keys already
            table = keys if isinstance(keys, PackedKeys) else PackedKeys.pack_rows(keys)
        except PackError as exc:
            self.builds += 1
            log.warning("snapshot: keys sent as entries", extra={"error": str(exc)})
            return None
        self.builds += 1
        snap = PackedSnapshot(self._log_id(), head, anchor, table.encode(), tuple(entries))
        log.info(
            "packed snapshot built",
            extra={"revision": head, "keys": len(table), "bytes": len(snap.packed),
                   "seconds": round(time.perf_counter() - started, 3),
                   "cpu_seconds": round(time.thread_time() - cpu, 3)},
        )  # fmt: skip
        return snap

    def _keep(self, snap: PackedSnapshot | None) -> None:
        """Write ``snap`` to the snapshot file (outside ``_build_lock``: sidecars waiting for
        the snapshot get it while it is written)."""
        if snap is None or self._file is None:
            return
        started = time.perf_counter()
        try:
            self._file.save(snap)
            log.info("packed snapshot kept on disk",
                     extra={"seconds": round(time.perf_counter() - started, 3)})  # fmt: skip
        except OSError as exc:
            log.warning("cannot keep the packed snapshot on disk",
                        extra={"file": str(self._file.path), "error": str(exc)})  # fmt: skip

    def _usable(self, snap: PackedSnapshot) -> bool:
        """Whether a snapshot read from disk may be served: of this store's change log, not
        ahead of it, at most REUSE_CHANGES behind, and the log's entry at its revision the
        one it was built after (a restored database reuses revision numbers)."""
        with self._store.read() as uow:
            head = uow.changes.head()
            ok = (
                snap.log_id == uow.changes.log_id()
                and 0 <= head - snap.revision <= REUSE_CHANGES
                and snap.anchor == anchor_of(entry_at(uow, snap.revision))
            )
        if not ok:
            log.warning(
                "the snapshot file is stale (another or a restored database, or too far "
                "behind); building the snapshot from the store",
                extra={"revision": snap.revision, "head": head},
            )
        return ok


def entry_at(uow: UnitOfWork, revision: int) -> Change | None:
    """The change-log entry at ``revision`` (None: there is none)."""
    found = uow.changes.since(revision - 1, 1) if revision > 0 else []
    return found[0] if found and found[0].revision == revision else None
