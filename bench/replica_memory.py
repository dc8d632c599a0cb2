"""Where a sidecar replica's bytes per API key go: the snapshot as the client receives it
(protobuf ``ReplicaChange`` with a JSON payload), parsed into ``Change`` entries, loaded into a
``Replica``, then written as the persisted replica file — the same stages as a cold start.

    python -m bench.replica_memory [--keys 100000]

Prints, per key: live bytes at each stage (tracemalloc), the peak, the allocating lines of what
stays, ``sys.getsizeof`` of each part of one credential, the load time per key (measured without
tracemalloc) and the process RSS, which keeps the transient peak (freed small objects stay in
pymalloc arenas interleaved with live ones). In process, no control plane: a few seconds.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import sys
import time
import tracemalloc
from collections.abc import Callable

from sidecar.authz.replica import Replica
from sidecar.core import keyformat
from sidecar.core.models import Change
from sidecar.replication.client import from_pb
from sidecar.replication.server import to_pb


def _snapshot(n: int) -> list[object]:
    """``n`` keys as the control plane streams them: 1,000 workspaces, one scope each."""
    now = int(time.time())
    changes = (
        Change(
            "credential.upserted",
            f"k{i}",
            {
                "id": keyformat.mint_id(),
                "digest": hashlib.sha256(os.urandom(16)).hexdigest(),
                "workspace": f"ws_{i % 1000:020d}",
                "scopes": ["checks:read"],
                "expires_at": now + 86400,
            },
            revision=i + 1,
        )
        for i in range(n)
    )
    return [to_pb(c) for c in changes]


def _rss_bytes() -> int:
    for line in open("/proc/self/status"):  # noqa: SIM115 - a few lines, closed by GC
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _per_key(n: int) -> Callable[[float], str]:
    return lambda size: f"{size / n:7.0f} B/key"


def parts(replica: Replica) -> dict[str, float]:
    """``sys.getsizeof`` of each part of one credential; dict slots amortised over all keys."""
    digest, cred = next(iter(replica.by_digest.items()))
    ident = cred.identity
    return {
        "by_digest dict slot": sys.getsizeof(replica.by_digest) / len(replica.by_digest),
        "_digest_of dict slot (id -> digest)": sys.getsizeof(replica._digest_of)
        / len(replica._digest_of),
        "digest bytes object": sys.getsizeof(digest),
        "Credential": sys.getsizeof(cred),
        "Identity": sys.getsizeof(ident),
        "key id str": sys.getsizeof(ident.id),
        "workspace str (one per key, not shared)": sys.getsizeof(ident.workspace),
        "scopes frozenset (one per key)": sys.getsizeof(ident.scopes),
        "scope strs (one per key)": sum(sys.getsizeof(s) for s in ident.scopes),
        "expires_at int": sys.getsizeof(ident.expires_at),
    }


def measure(n: int) -> None:
    """Print the breakdown for ``n`` keys."""
    wire = _snapshot(n)
    kb = _per_key(n)
    gc.collect()
    rss0 = _rss_bytes()
    started = time.perf_counter()
    entries = [from_pb(m) for m in wire]  # type: ignore[arg-type]
    parsed = time.perf_counter()
    replica = Replica()
    replica.load_snapshot(n, entries)
    loaded = time.perf_counter()
    del entries
    gc.collect()
    print(f"{n} keys; from_pb {(parsed - started) / n * 1e6:.1f} us/key, "
          f"load_snapshot {(loaded - parsed) / n * 1e6:.1f} us/key")  # fmt: skip
    print(f"RSS growth, entries freed: {kb(_rss_bytes() - rss0)}")
    del replica
    gc.collect()

    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    entries = [from_pb(m) for m in wire]  # type: ignore[arg-type]
    print(
        f"parsed entries (Change + payload dict): {kb(tracemalloc.get_traced_memory()[0] - base)}"
    )
    replica = Replica()
    tracemalloc.reset_peak()
    replica.load_snapshot(n, entries)
    print(f"peak while loading: {kb(tracemalloc.get_traced_memory()[1] - base)}")
    del entries
    gc.collect()
    print(f"replica, entries freed: {kb(tracemalloc.get_traced_memory()[0] - base)}")
    held = tracemalloc.take_snapshot()
    tracemalloc.reset_peak()
    text = replica.dumps()
    print(f"peak while writing the replica file ({kb(len(text))} of JSON): "
          f"{kb(tracemalloc.get_traced_memory()[1] - base)}")  # fmt: skip
    del text
    tracemalloc.stop()
    print("what stays, by allocating line:")
    for stat in held.statistics("lineno")[:6]:
        print(f"  {kb(stat.size)}  {stat.traceback[0]}")
    print("one credential, sys.getsizeof by part:")
    for name, size in parts(replica).items():
        print(f"  {size:7.0f} B  {name}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.replica_memory", description=__doc__)
    p.add_argument("--keys", type=int, default=100_000)
    measure(p.parse_args(argv).keys)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
