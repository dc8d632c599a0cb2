"""Sidecar cold start and memory against replica size: N keys are written straight into a fresh
SQLite store, a control plane serves it, and a sidecar is timed from launch to gRPC health
SERVING (snapshot streamed and loaded); its RSS is read from /proc afterwards. A second sidecar
is timed the same way, as the next pod of a rollout (the control plane past its start-up sweeps,
its packed snapshot built). Then, in this process, the replica file the first sidecar persisted
is loaded again: the bytes per key the replica keeps (tracemalloc) and the load time per key.

    python -m bench.scale [--keys 10000 100000 1000000] [--out bench/results] [--logs DIR]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import IO

from bench.sidecar_target import _serving
from bench.targets import SERVER_ENV, TargetEnv
from sidecar.replication.client import SNAPSHOT_FILE

ROOT = Path(__file__).resolve().parent.parent


def _fill(db: Path, n: int) -> None:
    from sidecar.core.apikeys import ApiKeyService
    from sidecar.core.clock import SystemClock
    from sidecar.core.models import ApiKey, Change
    from sidecar.store.sql.sqlite import SqliteStore

    store = SqliteStore(db)
    ApiKeyService(store, SystemClock()).bootstrap_operator_key()
    now = int(time.time())
    with store.transaction() as uow:
        for i in range(n):
            # A random digest stands for a minted key's (no secret is ever presented here); the
            # keys expire in 90 days, outside the control plane's expiry-warning sweep.
            uow.keys.insert(
                ApiKey(f"key_scale{i:010d}", hashlib.sha256(os.urandom(24)).digest(), "abcd",
                       "bench", f"ws{i % 1000}", frozenset({"checks:read"}), now,
                       now + 90 * 86400, "bench")
            )  # fmt: skip
        uow.changes.append(Change("bench.filled", "bench", {"keys": n}))
    store.close()


def _listening(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return False
    return True


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _kept(path: Path, n: int) -> dict[str, float]:
    """Bytes per key a replica keeps and µs per key to load it, from the sidecar's own file
    (best of three loads; the keeping measured once, with tracemalloc)."""
    from sidecar.authz.replica import Replica

    data = path.read_bytes()
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        Replica().loads(data)
        best = min(best, time.perf_counter() - started)
    gc.collect()
    tracemalloc.start()
    replica = Replica()
    replica.loads(data)
    del data
    gc.collect()
    kept = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return {"kept_bytes_per_key": round(kept / n, 1), "load_us_per_key": round(best / n * 1e6, 2)}


def _log(logs: Path | None, name: str) -> int | IO[bytes]:
    """Where a process's log goes: a file under ``logs`` (kept), or nowhere."""
    if logs is None:
        return subprocess.DEVNULL
    logs.mkdir(parents=True, exist_ok=True)
    return (logs / name).open("wb")


def _sidecar(
    n: int, state: Path, admin: str, listen: str, data: Path, logs: Path | None, log: str
) -> tuple[float, float]:
    """Launch a sidecar; (seconds to SERVING, RSS in MB a second later)."""
    started = time.monotonic()
    sc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "sidecar", "--listen", listen, "--control-plane",
         admin, "--state-dir", str(state), "--metrics-addr", "",
         "--sync-token-file", str(data / "sync-token")],
        cwd=ROOT, env={**os.environ, **SERVER_ENV},
        stdout=subprocess.DEVNULL, stderr=_log(logs, log),
    )  # fmt: skip
    try:
        while not _serving(listen):
            if sc.poll() is not None or time.monotonic() - started > 600:
                raise RuntimeError(f"sidecar with {n} keys never became SERVING")
            time.sleep(0.05)
        cold = time.monotonic() - started
        time.sleep(1)
        return round(cold, 2), round(_rss_mb(sc.pid), 1)
    finally:
        sc.terminate()
        sc.wait(30)


def measure(n: int, work: Path, logs: Path | None = None) -> dict[str, float]:
    """Cold start (launch → SERVING) and RSS of one sidecar with ``n`` keys in its replica."""
    env = TargetEnv(frozenset({0}), work)
    data = work / f"cp-{n}"
    data.mkdir(parents=True)
    _fill(data / "spauth.db", n)
    admin, http, listen = (f"127.0.0.1:{env.free_port()}" for _ in range(3))
    cp = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "control-plane", "--data-dir", str(data),
         "--admin-addr", admin, "--http-addr", http],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=_log(logs, f"cp-{n}.log"),
    )  # fmt: skip
    try:
        # The control plane is up once its sync token is written and its admin port answers
        # (a fixed sleep was too short on a loaded machine).
        waited = time.monotonic()
        while not ((data / "sync-token").exists() and _listening(admin)):
            if cp.poll() is not None or time.monotonic() - waited > 120:
                raise RuntimeError("the control plane did not start")
            time.sleep(0.05)
        first = _sidecar(n, work / f"sc-{n}", admin, listen, data, logs, f"sc-{n}.log")
        # A second sidecar, as in a rollout: the control plane is past its start-up sweeps and
        # reuses the packed snapshot it built for the first.
        listen2 = f"127.0.0.1:{env.free_port()}"
        second = _sidecar(n, work / f"sc2-{n}", admin, listen2, data, logs, f"sc2-{n}.log")
        return {
            "keys": n,
            "cold_start_s": first[0],
            "rss_mb": first[1],
            "cold_start_warm_cp_s": second[0],
            **_kept(work / f"sc-{n}" / SNAPSHOT_FILE, n),
        }
    finally:
        cp.terminate()
        cp.wait(30)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--keys", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--logs", type=Path, help="keep the control plane's and sidecar's logs here")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.keys:
            row = measure(n, Path(tmp), args.logs)
            print(f"{row['keys']:>9} keys  cold start {row['cold_start_s']:>7.2f} s "
                  f"({row['cold_start_warm_cp_s']:.2f} s with a warm control plane)  "
                  f"RSS {row['rss_mb']:>8.1f} MB  kept {row['kept_bytes_per_key']:>6.1f} B/key  "
                  f"load {row['load_us_per_key']:>5.2f} us/key", flush=True)  # fmt: skip
            rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (args.out / f"scale-{stamp}.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
