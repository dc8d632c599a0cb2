"""Drive h2load: closed-loop saturation runs, open-loop fixed-rate runs and one-at-a-time
latency runs (``-c 1 -m 1``).

Two h2load behaviours shape this module:

* ``--rps`` is not smooth. Each client fires on a timer of ``max(10 ms, 1/rps)`` and sends every
  request that is due at once, and all clients start together, so ``-c 4 --rps 250`` sends
  bursts of ~10 requests every 10 ms. A fixed-rate run therefore uses several h2load processes,
  each ≤ 100 req/s (one request per tick), with slightly different rates and staggered starts so
  their ticks drift apart and arrivals spread over time.
* ``--log-file`` appends, and ``-D`` takes integers or unit suffixes ("1500ms") but no decimals.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.cpu import taskset_prefix

# One request per timer tick needs rps ≤ 100 per process (h2load's tick is ≥ 10 ms).
MAX_RPS_PER_PROCESS = 90.0


@dataclass(frozen=True)
class Load:
    """What one h2load run sends: URL, extra headers, optional POST body, expected statuses."""

    url: str
    headers: Sequence[tuple[str, str]]
    body_file: Path | None
    ok_statuses: range = range(200, 300)
    http1: bool = False


@dataclass(frozen=True)
class RunStats:
    """Counts and cost of one h2load process (or a group of them)."""

    rps: float
    done: int
    unexpected: int  # requests that failed or got a status outside Load.ok_statuses
    client_cpu_s: float


@dataclass(frozen=True)
class RateStats:
    """A fixed-rate run: per-request latencies (µs) plus its totals."""

    latencies_us: list[int]
    stats: RunStats


def duration_arg(seconds: float) -> str:
    """h2load's -D/--warm-up-time value: milliseconds, since it rejects decimals."""
    return f"{max(1, round(seconds * 1000))}ms"


def _argv(load: Load, extra: Sequence[str]) -> list[str]:
    argv = ["h2load", *extra, *(["--h1"] if load.http1 else [])]
    for name, value in load.headers:
        argv += ["-H", f"{name}: {value}"]
    if load.body_file is not None:
        argv += ["-d", str(load.body_file)]
    return [*argv, load.url]


def _spawn(argv: list[str], cpus: set[int], out: Path) -> subprocess.Popen[bytes]:
    with out.open("wb") as sink:
        return subprocess.Popen([*taskset_prefix(cpus), *argv], stdout=sink, stderr=sink)


class H2loadHung(RuntimeError):
    """h2load outlived its -D duration by more than HANG_GRACE seconds and was killed."""


# h2load can outlive -D (seen with --h1 against a server that closes connections); give up
# after this many seconds past the planned end rather than waiting forever.
HANG_GRACE = 20.0


def _reap(proc: subprocess.Popen[bytes], deadline: float) -> float:
    """Wait for ``proc`` until ``deadline`` (monotonic); return its CPU seconds from rusage.

    ``wait4`` rather than ``Popen.wait`` because only it reports the child's CPU time.
    """
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_utime + usage.ru_stime
        if time.monotonic() > deadline:
            proc.kill()
            _, status, _ = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            raise H2loadHung(f"h2load (pid {proc.pid}) ran past its duration; killed it")
        time.sleep(0.02)


# h2load prints the elapsed time in s, ms or us ("finished in 9us" when a short warm-up ended
# before any request was answered: CI saw that on a loaded machine).
_FINISHED = re.compile(r"finished in [\d.]+(?:s|ms|us), ([\d.]+) req/s")
_REQUESTS = re.compile(
    r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, \d+ failed, "
    r"(\d+) errored, (\d+) timeout"
)
_STATUSES = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")


def parse_summary(text: str, ok_statuses: range) -> tuple[float, int, int]:
    """(req/s, done, unexpected) from h2load's summary; raises ValueError if it is missing."""
    finished, requests, statuses = (p.search(text) for p in (_FINISHED, _REQUESTS, _STATUSES))
    if not (finished and requests and statuses):
        raise ValueError(f"h2load output not understood:\n{text[-2000:]}")
    # h2load counts a 4xx/5xx as "failed", so judge by status class; "errored" and
    # "timeout" streams got no status at all. (done and the status counts can disagree by a
    # few with HTTP/1.1, so neither is derived from the other.)
    by_class = {200 + 100 * i: int(n) for i, n in enumerate(statuses.groups())}
    wrong_status = sum(n for first, n in by_class.items() if first not in ok_statuses)
    no_status = int(requests.group(4)) + int(requests.group(5))
    return float(finished.group(1)), int(requests.group(2)), wrong_status + no_status


def saturate(
    load: Load, *, duration: float, clients: int, streams: int, cpus: set[int], workdir: Path
) -> RunStats:
    """Closed loop: ``clients`` connections x ``streams`` in flight each, for ``duration`` s.

    A run that answered nothing is run again, up to ``EMPTY_RUN_TRIES`` times: on a loaded
    machine h2load can end a short timed run before its first answer ("finished in 9us", seen
    in CI), which measures nothing (a ratio to it has no value). Still nothing: RuntimeError."""
    out = workdir / "h2load-saturate.txt"
    extra = ["-c", str(clients), "-m", str(streams), "-t", "1", "-D", duration_arg(duration)]
    for _ in range(EMPTY_RUN_TRIES):
        proc = _spawn(_argv(load, extra), cpus, out)
        cpu = _reap(proc, time.monotonic() + duration + HANG_GRACE)
        text = out.read_text(errors="replace")
        if proc.returncode != 0:
            raise RuntimeError(f"h2load exited {proc.returncode}:\n{text[-2000:]}")
        rps, done, unexpected = parse_summary(text, load.ok_statuses)
        if done or unexpected:
            return RunStats(rps, done, unexpected, cpu)
    raise RuntimeError(
        f"h2load answered nothing in {EMPTY_RUN_TRIES} runs of {duration} s:\n{text[-2000:]}"
    )


# Runs of a timed closed loop that answered nothing before saturate() gives up.
EMPTY_RUN_TRIES = 3


def split_rate(total: float) -> list[float]:
    """Per-process rates summing to ``total``, each ≤ MAX_RPS_PER_PROCESS and all different.

    Different rates mean different tick periods, so the processes' ticks keep drifting past
    each other instead of lining up into bursts.
    """
    n = max(1, math.ceil(total / (MAX_RPS_PER_PROCESS * 0.95)))
    base = total / n
    # Spread ±5 % around the mean; symmetric offsets keep the sum exact.
    return [round(base * (1 + 0.1 * (i / max(1, n - 1) - 0.5)), 3) for i in range(n)]


def fixed_rate(
    load: Load, *, rate: float, duration: float, cpus: set[int], workdir: Path
) -> RateStats:
    """Open loop at ``rate`` req/s total; returns every request's latency in µs."""
    rates = split_rate(rate)
    stagger = 1.0 / rate  # one inter-arrival gap between process starts
    procs: list[tuple[subprocess.Popen[bytes], Path, Path]] = []
    for i, r in enumerate(rates):
        log, out = workdir / f"h2load-rate-{i}.log", workdir / f"h2load-rate-{i}.txt"
        log.unlink(missing_ok=True)  # --log-file appends
        # -m 16: a slow answer must not hold back the next due request (open loop).
        extra = ["-c", "1", "-m", "16", "-t", "1", "--rps", str(r), "-D", duration_arg(duration)]
        procs.append((_spawn(_argv(load, [*extra, "--log-file", str(log)]), cpus, out), log, out))
        time.sleep(stagger)
    latencies: list[int] = []
    cpu, unexpected = 0.0, 0
    deadline = time.monotonic() + duration + HANG_GRACE
    for i, (proc, log, out) in enumerate(procs):
        try:
            cpu += _reap(proc, deadline)
        except H2loadHung:
            for rest, _, _ in procs[i + 1 :]:
                rest.kill()
                rest.wait()
            raise
        if proc.returncode != 0:
            raise RuntimeError(f"h2load exited {proc.returncode}:\n{out.read_text()[-2000:]}")
        took, wrong = _log_latencies(log, load.ok_statuses)
        latencies += took
        unexpected += wrong
    stats = RunStats(len(latencies) / duration, len(latencies), unexpected, cpu)
    return RateStats(latencies, stats)


def _log_latencies(log: Path, ok_statuses: range) -> tuple[list[int], int]:
    """Latencies (µs) and unexpected outcomes from a ``--log-file``."""
    latencies, unexpected = [], 0
    for line in log.read_text().splitlines():
        # Columns: start µs since epoch, HTTP status (-1 = failed stream), µs to response end.
        _, status, took = line.split("\t")[:3]
        latencies.append(int(took))
        unexpected += int(status) not in ok_statuses
    return latencies, unexpected


def one_at_a_time(load: Load, *, duration: float, cpus: set[int], workdir: Path) -> RateStats:
    """Closed loop with one request in flight (``-c 1 -m 1``): each request is sent when the
    previous answer arrived, so its latency is the path's own, without queueing behind others
    and without the idle server's wake-up a fixed low rate adds to every request."""
    log, out = workdir / "h2load-serial.log", workdir / "h2load-serial.txt"
    log.unlink(missing_ok=True)  # --log-file appends
    extra = ["-c", "1", "-m", "1", "-t", "1", "-D", duration_arg(duration), "--log-file", str(log)]
    proc = _spawn(_argv(load, extra), cpus, out)
    cpu = _reap(proc, time.monotonic() + duration + HANG_GRACE)
    if proc.returncode != 0:
        raise RuntimeError(f"h2load exited {proc.returncode}:\n{out.read_text()[-2000:]}")
    latencies, unexpected = _log_latencies(log, load.ok_statuses)
    return RateStats(
        latencies, RunStats(len(latencies) / duration, len(latencies), unexpected, cpu)
    )


def percentile(sorted_values: Sequence[int], fraction: float) -> int:
    """Nearest-rank percentile of an ascending sequence (fraction in (0, 1])."""
    if not sorted_values:
        raise ValueError("no samples")
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def version() -> str:
    """h2load's version line, or 'missing'."""
    try:
        out = subprocess.run(["h2load", "--version"], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return "missing"
    return out.stdout.strip() or out.stderr.strip()
