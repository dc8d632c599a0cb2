"""Sidecar cold start and memory against replica size: N keys are written straight into a fresh
SQLite store, a control plane is started on it, and a sidecar launched as soon as the control
plane's admin port answers is timed from launch to gRPC health SERVING (snapshot streamed and
loaded); its RSS is read from /proc afterwards. A second sidecar is timed the same way against
the running control plane, as the next pod of a rollout. Then the control plane is restarted
(it reads the packed snapshot it kept on disk) and a third sidecar is launched as soon as its
admin port answers. The control plane's own start (launch to its gRPC health SERVING, i.e. its
packed snapshot at hand) is timed both times, and the load average is recorded. Then, in this
process, the replica file the first sidecar persisted is loaded again: the bytes per key the
replica keeps (tracemalloc) and the load time per key; and, on the same store, where the control
plane's first snapshot build goes (reading the keys, packing them, writing the file) beside the
builder it replaced.

Memory, read a second after SERVING: the sidecar's RSS and peak RSS (VmHWM: the snapshot's
load included), and the same of its control-plane link process; and the pod's share, the PSS
of both (``/proc/PID/smaps_rollup``: each page divided among the processes that map it, so the
interpreter's and grpc's library pages the two share count once in the sum).

The processes run with their bytecode cached, as in the image (pip compiles what it installs):
this checkout's venv is installed ``--no-compile`` with ``PYTHONDONTWRITEBYTECODE=1``, and a
process that compiles its modules at start spends ≈ 0.5 s of CPU and keeps ≈ 4 MB of the
compiler's heap. ``--no-bytecode-cache`` measures that way instead.

    python -m bench.scale [--keys 10000 100000 1000000] [--out bench/results] [--logs DIR]
"""

from __future__ import annotations

import argparse
import contextlib
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


def _rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _pss_mb(pid: int) -> float:
    """Proportional set size: the process's own pages plus its share of those it maps with
    others (``/proc/PID/smaps_rollup``)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _children(pid: int) -> set[int]:
    """``pid``'s child processes (the sidecar's control-plane link)."""
    return {  # each thread's own children: the link is started from the sync thread
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    }


def _memory(pid: int) -> dict[str, float]:
    """The sidecar's and its link's memory in MB: RSS and peak RSS of each, the link's
    anonymous RSS (what it adds beyond the library pages it shares with the sidecar), and the
    PSS of both and their sum (the pod's share)."""
    link = {"rss": 0.0, "peak": 0.0, "anon": 0.0, "pss": 0.0}
    for child in _children(pid):
        with contextlib.suppress(OSError):  # a child that just exited holds nothing
            read = {"rss": _rss_mb(child), "peak": _rss_mb(child, "VmHWM"),
                    "anon": _rss_mb(child, "RssAnon"), "pss": _pss_mb(child)}  # fmt: skip
            link = {k: link[k] + read[k] for k in link}
    pss = _pss_mb(pid)
    return {
        "rss_mb": round(_rss_mb(pid), 1),
        "peak_rss_mb": round(_rss_mb(pid, "VmHWM"), 1),
        "pss_mb": round(pss, 1),
        "link_rss_mb": round(link["anon"], 1),  # the figure earlier runs reported
        "link_total_rss_mb": round(link["rss"], 1),
        "link_peak_rss_mb": round(link["peak"], 1),
        "link_pss_mb": round(link["pss"], 1),
        "pod_pss_mb": round(pss + link["pss"], 1),
    }


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


def _build_parts(db: Path, n: int) -> dict[str, float | str]:
    """Where a control plane's first snapshot build goes, in this process on the same store
    (µs per key, wall and CPU, best of two; one at a million keys): reading the keys
    (``packing_rows``), reading and packing them (``packed_keys``), writing and checksumming
    the snapshot file; and the builder it replaced (``replica_rows`` + ``PackedKeys.pack_rows``)
    for comparison."""
    from sidecar.core.packed import PackedKeys
    from sidecar.replication.packing import packed_keys, unavailable
    from sidecar.replication.snapshot_file import PackedSnapshot, SnapshotFile
    from sidecar.store.sql.sqlite import SqliteStore

    store = SqliteStore(db)
    now = int(time.time())
    file = SnapshotFile(db.parent / "build-parts.bin")
    packed = b""

    def read() -> None:  # as the build reads: in table order when it packs in C
        with store.read() as uow:
            for _ in uow.keys.packing_rows(now, ordered=bool(unavailable())):
                pass

    def build() -> None:
        nonlocal packed
        with store.read() as uow:
            packed = packed_keys(uow, now).encode()

    def write() -> None:
        file.save(PackedSnapshot("bench", 1, "", packed, ()))

    def reference() -> None:
        with store.read() as uow:
            rows = list(uow.keys.replica_rows(now))
        assert PackedKeys.pack_rows(rows).encode() == packed  # the same table, byte for byte

    parts: dict[str, float | str] = {"packing": "python" if unavailable() else "compiled"}
    try:
        for name, step in (("read", read), ("build", build), ("file_write", write),
                           ("reference_build", reference)):  # fmt: skip
            best = best_cpu = float("inf")
            for _ in range(2 if n < 1_000_000 else 1):
                gc.collect()
                started, cpu = time.perf_counter(), time.process_time()
                step()
                best = min(best, time.perf_counter() - started)
                best_cpu = min(best_cpu, time.process_time() - cpu)
            parts[f"{name}_us_per_key"] = round(best / n * 1e6, 2)
            parts[f"{name}_cpu_us_per_key"] = round(best_cpu / n * 1e6, 2)
    finally:
        store.close()
        file.path.unlink(missing_ok=True)
    return parts


def _log(logs: Path | None, name: str) -> int | IO[bytes]:
    """Where a process's log goes: a file under ``logs`` (kept), or nowhere."""
    if logs is None:
        return subprocess.DEVNULL
    logs.mkdir(parents=True, exist_ok=True)
    return (logs / name).open("wb")


def _sidecar(
    n: int,
    state: Path,
    admin: str,
    listen: str,
    data: Path,
    logs: Path | None,
    log: str,
    cp: _Started | None = None,
) -> dict[str, float]:
    """Launch a sidecar; seconds to SERVING (``cold_start_s``) and, a second later, its
    memory and its link's (:func:`_memory`). With ``cp``, the control plane started just
    before is watched too, until its health says SERVING."""
    started = time.monotonic()
    sc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "sidecar", "--listen", listen, "--control-plane",
         admin, "--state-dir", str(state), "--metrics-addr", "",
         "--sync-token-file", str(data / "sync-token")],
        cwd=ROOT, env={**os.environ, **SERVER_ENV},
        stdout=subprocess.DEVNULL, stderr=_log(logs, log),
    )  # fmt: skip
    try:
        cold = 0.0
        while not cold or (cp is not None and not cp.ready):
            if cp is not None and not cp.ready and _serving(admin):
                cp.ready = time.monotonic() - cp.launched
            if not cold and _serving(listen):
                cold = time.monotonic() - started
            if sc.poll() is not None or time.monotonic() - started > 600:
                raise RuntimeError(f"sidecar with {n} keys never became SERVING")
            time.sleep(0.05)
        time.sleep(1)
        return {"cold_start_s": round(cold, 2), **_memory(sc.pid)}
    finally:
        sc.terminate()
        sc.wait(30)


class _Started:
    """A control plane process, when it was launched and how long it took to be ready."""

    def __init__(self, proc: subprocess.Popen[bytes], launched: float) -> None:
        self.proc = proc
        self.launched = launched
        self.ready = 0.0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def _control_plane(data: Path, admin: str, http: str, logs: Path | None, log: str) -> _Started:
    """Launch a control plane and return once its admin port answers (its packed snapshot may
    still be in the making: a sidecar launched now waits for it, as in a real rollout)."""
    argv = [sys.executable, "-m", "sidecar", "control-plane", "--data-dir", str(data),
            "--admin-addr", admin, "--http-addr", http]  # fmt: skip
    launched = time.monotonic()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=_log(logs, log))
    cp = _Started(proc, launched)
    # Up once its sync token is written and its admin port answers (a fixed sleep was too
    # short on a loaded machine).
    while not ((data / "sync-token").exists() and _listening(admin)):
        if cp.proc.poll() is not None or time.monotonic() - cp.launched > 120:
            cp.stop()
            raise RuntimeError("the control plane did not start")
        time.sleep(0.05)
    return cp


def measure(n: int, work: Path, logs: Path | None = None) -> dict[str, float | str]:
    """Cold starts (launch → SERVING) and RSS of sidecars with ``n`` keys in their replica."""
    env = TargetEnv(frozenset({0}), work)
    data = work / f"cp-{n}"
    data.mkdir(parents=True)
    _fill(data / "spauth.db", n)
    admin, http = (f"127.0.0.1:{env.free_port()}" for _ in range(2))
    listen = [f"127.0.0.1:{env.free_port()}" for _ in range(3)]
    load = os.getloadavg()[0]
    cp = _control_plane(data, admin, http, logs, f"cp-{n}.log")
    try:
        first = _sidecar(n, work / f"sc-{n}", admin, listen[0], data, logs, f"sc-{n}.log", cp)
        # A second sidecar, as in a rollout: the control plane is running, its snapshot built.
        second = _sidecar(n, work / f"sc2-{n}", admin, listen[1], data, logs, f"sc2-{n}.log")
    finally:
        cp.stop()
    cp_ready = cp.ready
    # A restart: the control plane serves the snapshot it kept on disk.
    cp = _control_plane(data, admin, http, logs, f"cp2-{n}.log")
    try:
        third = _sidecar(n, work / f"sc3-{n}", admin, listen[2], data, logs, f"sc3-{n}.log", cp)
    finally:
        cp.stop()
    return {
        "keys": n,
        "load_average": round(load, 2),
        **first,
        **{f"warm_cp_{k}": v for k, v in second.items() if k != "cold_start_s"},
        "cold_start_warm_cp_s": second["cold_start_s"],
        "cold_start_restarted_cp_s": third["cold_start_s"],
        "cp_ready_s": round(cp_ready, 2),
        "cp_restart_ready_s": round(cp.ready, 2),
        **_kept(work / f"sc-{n}" / SNAPSHOT_FILE, n),
        **_build_parts(data / "spauth.db", n),
    }


def _cache_bytecode(work: Path) -> None:
    """Have the processes started from here read and write their bytecode in a cache of this
    run (``PYTHONPYCACHEPREFIX``), filled by one short run of a control plane and a sidecar
    (with its link) first, so the measured ones start as they do in the image."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    measure(10, work / "bytecode")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--keys", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--logs", type=Path, help="keep the control plane's and sidecar's logs here")
    p.add_argument(
        "--no-bytecode-cache",
        action="store_true",
        help="every process compiles its modules at start (this venv's way)",
    )
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_bytecode_cache:
            _cache_bytecode(Path(tmp))
        for n in args.keys:
            row = measure(n, Path(tmp), args.logs)
            print(f"{row['keys']:>9} keys  cold start {row['cold_start_s']:>6.2f} s with a "
                  f"control plane just started (ready in {row['cp_ready_s']:.2f} s), "
                  f"{row['cold_start_warm_cp_s']:.2f} s with a running one, "
                  f"{row['cold_start_restarted_cp_s']:.2f} s with one just restarted (ready in "
                  f"{row['cp_restart_ready_s']:.2f} s)  RSS {row['rss_mb']:.1f} MB "
                  f"(peak {row['peak_rss_mb']:.1f}; + its link process "
                  f"{row['link_rss_mb']:.1f} MB anonymous, RSS {row['link_total_rss_mb']:.1f}, "
                  f"peak {row['link_peak_rss_mb']:.1f})  PSS sidecar {row['pss_mb']:.1f} + link "
                  f"{row['link_pss_mb']:.1f} = pod {row['pod_pss_mb']:.1f} MB  "
                  f"kept {row['kept_bytes_per_key']:.1f} B/key  "
                  f"load {row['load_us_per_key']:.2f} us/key  "
                  f"first build ({row['packing']}) {row['build_us_per_key']:.2f} us/key, CPU "
                  f"{row['build_cpu_us_per_key']:.2f} (read "
                  f"{row['read_us_per_key']:.2f}, file {row['file_write_us_per_key']:.2f}; "
                  f"the former builder {row['reference_build_us_per_key']:.2f}, CPU "
                  f"{row['reference_build_cpu_us_per_key']:.2f})  "
                  f"(load average {row['load_average']:.2f})", flush=True)  # fmt: skip
            rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (args.out / f"scale-{stamp}.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
