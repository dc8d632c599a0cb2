"""Where a sidecar replica's bytes per API key go, and what a key costs to load and look up:
the snapshot as the client receives it (the packed key table of ``Snapshot.packed_keys``),
decoded and loaded into a ``Replica``, then written as the replica file — the stages of a cold
start — and, with ``--entries``, the same for the entry-per-key snapshot an older control plane
sends.

    python -m bench.replica_memory [--keys 100000] [--entries] [--fold]

Prints, per key: the wire size, the live bytes the replica keeps and the peak while loading and
writing (tracemalloc), the load time (measured without tracemalloc), the RSS growth, and the
lookup time of ``Replica.credential`` (a cached hit, an uncached hit, a miss). With ``--fold``:
how long folding an eighth of the table's size of changes takes on its thread, and the longest a
revocation applied meanwhile waited (the sync thread's view). In process, no control plane: a few
seconds.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import random
import threading
import time
import timeit
import tracemalloc
from collections.abc import Callable

from sidecar.authz.replica import FoldJob, Replica
from sidecar.core import changes, keyformat
from sidecar.core.models import Change
from sidecar.core.packed import PackedKeys
from sidecar.replication.client import from_pb
from sidecar.replication.server import to_pb


def keys(n: int) -> list[changes.CredentialUpserted]:
    """``n`` keys: 1,000 workspaces, one scope each."""
    now = int(time.time())
    return [
        changes.CredentialUpserted(
            keyformat.mint_id(),
            hashlib.sha256(os.urandom(16)).digest(),
            f"ws_{i % 1000:020d}",
            frozenset({"checks:read"}),
            now + 86400,
        )
        for i in range(n)
    ]


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def per_key(n: int) -> Callable[[float], str]:
    return lambda size: f"{size / n:7.0f} B/key"


def lookups(replica: Replica, digest: bytes) -> dict[str, float]:
    """Microseconds per ``credential()`` call, best of five."""

    def best(fn: Callable[[], object], number: int = 100_000) -> float:
        return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6

    def uncached() -> object:
        replica._keys.cache.clear()
        return replica.credential(digest)

    missing = hashlib.sha256(b"not a key").digest()
    return {
        "hit (cached)": best(lambda: replica.credential(digest)),
        "hit (built from the table)": best(uncached),
        "miss": best(lambda: replica.credential(missing)),
    }


def measure(n: int, entries: bool = False) -> dict[str, float]:
    """Print and return the figures for ``n`` keys."""
    made = keys(n)
    kb = per_key(n)
    started = time.perf_counter()
    wire = PackedKeys.pack(made).encode()
    packed_at = time.perf_counter()
    old_wire = [to_pb(m.change()) for m in made] if entries else []
    digest = made[n // 2].digest
    del made
    gc.collect()
    print(f"{n} keys; control plane packs {(packed_at - started) / n * 1e6:.2f} us/key; "
          f"packed table on the wire {kb(len(wire))}")  # fmt: skip
    rss0 = rss_bytes()
    started = time.perf_counter()
    replica = Replica()
    replica.load_packed(n, PackedKeys.decode(wire), [])
    load_us = (time.perf_counter() - started) / n * 1e6
    gc.collect()
    rss = rss_bytes() - rss0
    print(f"load (decode, check, index): {load_us:.2f} us/key; RSS growth {kb(rss)}")
    del replica
    gc.collect()

    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    replica = Replica()
    replica.load_packed(n, PackedKeys.decode(wire), [])
    peak = tracemalloc.get_traced_memory()[1] - base
    gc.collect()
    kept = tracemalloc.get_traced_memory()[0] - base
    print(f"kept by the replica: {kb(kept)}; peak while loading: {kb(peak)}")
    tracemalloc.reset_peak()
    parts = replica.dump_parts()  # as the sidecar writes it, piece by piece
    file_peak = tracemalloc.get_traced_memory()[1] - base - kept
    print(f"replica file {kb(sum(map(len, parts)))}; extra peak while writing it {kb(file_peak)}")
    del parts
    tracemalloc.stop()
    row: dict[str, float] = {
        "keys": n,
        "wire_bytes_per_key": round(len(wire) / n, 1),
        "load_us_per_key": round(load_us, 2),
        "kept_bytes_per_key": round(kept / n, 1),
        "load_peak_bytes_per_key": round(peak / n, 1),
        "rss_growth_bytes_per_key": round(rss / n, 1),
    }
    for name, us in lookups(replica, digest).items():
        print(f"lookup, {name}: {us:.3f} us")
        row[f"lookup_us_{name.split()[0]}"] = round(us, 3)
    if entries:
        del replica
        gc.collect()
        started = time.perf_counter()
        replica = Replica()
        replica.load_snapshot(n, [from_pb(m) for m in old_wire])
        old_us = (time.perf_counter() - started) / n * 1e6
        print(f"entry-per-key snapshot (an older control plane): {old_us:.2f} us/key to load")
        row["entries_load_us_per_key"] = round(old_us, 2)
    return row


def fold(n: int) -> dict[str, float]:
    """Fold an overlay of n/8 new keys into an ``n``-key table on the fold thread while this
    thread applies revocations of table keys: the fold's build and swap, and the longest
    ``apply`` of a revocation meanwhile (each checked effective at once)."""
    spans: dict[str, float] = {}
    begun, done = threading.Event(), threading.Event()

    def run(job: FoldJob) -> None:
        started = time.perf_counter()
        job.build()
        built = time.perf_counter()
        job.install()
        spans["build_s"] = built - started
        spans["install_ms"] = (time.perf_counter() - built) * 1e3
        done.set()

    def runner(job: FoldJob) -> None:
        begun.set()
        threading.Thread(target=run, args=(job,)).start()

    made = keys(n)
    replica = Replica(runner)
    replica.load_packed(1, PackedKeys.pack(made), [])
    revision = 1
    for m in keys(n // 8 + 1):
        revision += 1
        replica.apply(at(m.change(), revision))
        if begun.is_set():
            break
    waits: list[float] = []
    victims = random.sample(made, min(len(made), 100_000))
    while not done.is_set() and victims:
        victim = victims.pop()
        revision += 1
        started = time.perf_counter()
        replica.apply(at(changes.CredentialRevoked(victim.id).change(), revision))
        waits.append(time.perf_counter() - started)
        cred = replica.credential(victim.digest)
        if cred is None or not cred.revoked:
            raise AssertionError("a revocation applied during the fold was not effective")
    done.wait()
    row = {
        "fold_build_s": round(spans["build_s"], 3),
        "fold_install_ms": round(spans["install_ms"], 2),
        "revocations_during_fold": len(waits),
        "longest_apply_during_fold_ms": round(max(waits, default=0.0) * 1e3, 2),
    }
    print(f"fold of {revision - 1 - len(waits)} changes into {n} keys: build "
          f"{row['fold_build_s']:.2f} s on its thread, swap {row['fold_install_ms']:.1f} ms "
          f"under the lock; {len(waits)} revocations applied meanwhile, the longest in "
          f"{row['longest_apply_during_fold_ms']:.2f} ms")  # fmt: skip
    return row


def at(change: Change, revision: int) -> Change:
    return Change(change.kind, change.subject, change.payload, revision)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.replica_memory", description=__doc__)
    p.add_argument("--keys", type=int, default=100_000)
    p.add_argument("--entries", action="store_true", help="also load an entry-per-key snapshot")
    p.add_argument("--fold", action="store_true", help="also time a fold and the sync thread")
    args = p.parse_args(argv)
    measure(args.keys, args.entries)
    if args.fold:
        fold(args.keys)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
