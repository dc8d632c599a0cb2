"""System calls per request through Envoy: Envoy + sidecar against Envoy + do-nothing.

    python -m bench.syscalls [--requests N]

Does the sidecar make Envoy work harder per request than the do-nothing server does — more
reads and writes on the ext_authz connection, more wake-ups? Throughput through Envoy reads
0.77 to 1.06 of Envoy + do-nothing rep to rep on this box, too noisy to say; a count is not. Both
rows of ``bench.envoy_targets:envoy_sidecar`` are started (the sidecar as shipped, a real control
plane, the bench's API key); each process — Envoy, then its ext_authz server — is traced with
``strace -c -f`` (every thread) while h2load sends N requests one at a time, and the calls are
printed per request, side by side. Needs ``strace`` and ptrace permission over own processes."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from bench.cases import HttpCase
from bench.envoy_targets import envoy_sidecar
from bench.targets import RunningTarget, TargetEnv

# ``strace -c`` rows: "% time  seconds  usecs/call  calls  [errors]  syscall"; errors may be blank.
_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$")
# What a table shows: calls made at least once every 20 requests by either row.
SHOWN = 0.05


def parse_summary(text: str) -> dict[str, int]:
    """Calls per system call from ``strace -c`` output (the ``total`` row left out)."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        m = _ROW.match(line)
        if m and m.group(2) != "total":
            counts[m.group(2)] = int(m.group(1))
    return counts


def per_request(counts: Mapping[str, int], requests: int) -> dict[str, float]:
    """Calls per request, with ``total`` summed over every system call."""
    rows = {name: n / requests for name, n in counts.items()}
    rows["total"] = sum(counts.values()) / requests
    return rows


def table(rows: Mapping[str, Mapping[str, float]]) -> list[str]:
    """One line per system call any column makes at least ``SHOWN`` times a request (``total``
    last), the columns in ``rows``' order."""
    names = sorted(
        {n for col in rows.values() for n, v in col.items() if v >= SHOWN and n != "total"},
        key=lambda n: -max(col.get(n, 0.0) for col in rows.values()),
    )
    head = f"{'syscall':<16}" + "".join(f"{label:>22}" for label in rows)
    return [head] + [
        f"{name:<16}" + "".join(f"{col.get(name, 0.0):>22.2f}" for col in rows.values())
        for name in [*names, "total"]
    ]


def _h2load(target: RunningTarget, requests: int) -> list[str]:
    case = target.cases[0]
    if not isinstance(case, HttpCase):
        raise TypeError(f"{target.name}: an HTTP case was expected, not {case.kind}")
    argv = ["h2load", "-n", str(requests), "-c", "1", "-m", "1", "-t", "1"]
    for name, value in case.headers.items():
        argv += ["-H", f"{name}: {value}"]
    return [*argv, target.address.rstrip("/") + case.path]


def _load(argv: Sequence[str], requests: int) -> None:
    out = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
    done = re.search(r"(\d+) succeeded", out)
    if done is None or int(done.group(1)) != requests:
        raise SystemExit(f"h2load did not finish its {requests} requests:\n{out[-2000:]}")


def traced(pid: int, argv: Sequence[str], requests: int, out: Path) -> dict[str, int]:
    """``strace -c`` of every thread of ``pid`` while ``argv`` (h2load) runs."""
    strace = subprocess.Popen(
        ["strace", "-c", "-f", "-p", str(pid), "-o", str(out)],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert strace.stderr is not None
    # "Process N attached with K threads", once every thread of N is attached
    line = strace.stderr.readline()
    if "attached" not in line:
        strace.kill()
        raise SystemExit(f"strace could not attach to {pid}: {line.strip()}")
    try:
        _load(argv, requests)
    finally:
        strace.terminate()
        strace.wait()
    return parse_summary(out.read_text())


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.syscalls", description=__doc__)
    p.add_argument("--requests", type=int, default=2000, help="requests per traced run (2000)")
    args = p.parse_args(argv)
    # A SIGTERM (``timeout``, a CI job's end) unwinds the targets' context managers as Ctrl-C
    # does, so Envoy, the sidecar and the control plane stop with this process.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="bench-syscalls-") as tmp:
        env = TargetEnv(server_cpus=frozenset(os.sched_getaffinity(0)), workdir=Path(tmp))
        with envoy_sidecar(env) as sidecar:
            assert sidecar.reference is not None
            columns = {"Envoy + do-nothing": sidecar.reference, "Envoy + sidecar": sidecar}
            for process, index in (("Envoy", 0), ("its ext_authz server", 1)):
                rows = {}
                for label, target in columns.items():
                    load = _h2load(target, args.requests)
                    _load(load, args.requests)  # warm: connections, caches, the key's credential
                    counts = traced(
                        target.pids[index], load, args.requests, Path(tmp) / f"{index}.txt"
                    )
                    rows[label] = per_request(counts, args.requests)
                print(
                    f"\n{process}: system calls per request ({args.requests} requests, 1 at a time)"
                )
                print("\n".join(table(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
