"""A closed-loop HTTP driver for requests h2load cannot repeat: every token request needs a
fresh authorization code, and a refresh token works once (RFC 9700 §4.14.2: a reused one
revokes the grant). ``clients`` threads each keep one HTTP/1.1 connection and send their next
request as soon as the previous answer arrives; a :class:`Feed` says what to send next.

The driver runs on the client CPUs and measures its own CPU per call (per-thread rusage), so a
row can show that the driver was not what limited it."""

from __future__ import annotations

import http.client
import os
import resource
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

FORM = "application/x-www-form-urlencoded"


class Feed(Protocol):
    """What worker ``worker`` sends: a form body, or None when it has no more work."""

    def first(self, worker: int) -> str | None: ...

    def next(self, worker: int, answer: bytes) -> str | None: ...


@dataclass
class _Worker:
    latencies_us: list[int] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None
    cpu_s: float = 0.0


@dataclass(frozen=True)
class DriverRun:
    """Totals of one closed-loop run."""

    requests: int  # answered with 200
    errors: int  # any other status, a broken connection, or a Feed that rejected the answer
    elapsed_s: float
    latencies_us: list[int]  # sorted, successful requests only
    driver_cpu_s: float
    first_error: str | None


def _thread_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_utime + usage.ru_stime


def _post(conn: http.client.HTTPConnection, path: str, body: str, auth: str) -> tuple[int, bytes]:
    headers = {"content-type": FORM, "authorization": auth}
    conn.request("POST", path, body=body, headers=headers)
    resp = conn.getresponse()
    return resp.status, resp.read()


def _work(
    worker: int,
    state: _Worker,
    feed: Feed,
    target: tuple[str, int, str, str],
    cpus: set[int] | None,
    duration: float,
    start: threading.Barrier,
) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)  # 0 = this thread on Linux
    host, port, path, auth = target
    conn = http.client.HTTPConnection(host, port, timeout=30)
    body = feed.first(worker)
    start.wait()  # every worker starts (and its deadline counts) from the same moment
    deadline = time.monotonic() + duration
    cpu0 = _thread_cpu_s()
    try:
        while body is not None and time.monotonic() < deadline:
            t0 = time.perf_counter_ns()
            try:
                status, answer = _post(conn, path, body, auth)
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                status, answer = 0, str(exc).encode()
            elapsed = (time.perf_counter_ns() - t0) // 1000
            if status != 200:
                state.errors += 1
                state.first_error = state.first_error or f"HTTP {status}: {answer[:200]!r}"
                break  # a failed token request leaves this worker's sequence unusable
            state.latencies_us.append(elapsed)
            try:
                body = feed.next(worker, answer)
            except ValueError as exc:
                state.errors += 1
                state.first_error = state.first_error or f"bad answer: {exc}"
                break
    finally:
        state.cpu_s = _thread_cpu_s() - cpu0
        conn.close()


def run(
    address: str,
    path: str,
    authorization: str,
    feed: Feed,
    *,
    clients: int,
    duration: float,
    cpus: set[int] | None = None,
    on_start: Callable[[], None] | None = None,
) -> DriverRun:
    """Drive ``clients`` closed loops against ``http://address{path}`` until ``duration``
    seconds pass or the feed runs dry; ``on_start`` runs just before the workers are released
    (to open a CPU window at the moment the load starts)."""
    host, _, port = address.rpartition(":")
    states = [_Worker() for _ in range(clients)]
    start = threading.Barrier(clients + 1)
    target = (host, int(port), path, authorization)
    threads = [
        threading.Thread(
            target=_work,
            args=(i, states[i], feed, target, cpus, duration, start),
            name=f"oauth-driver-{i}",
        )
        for i in range(clients)
    ]
    for t in threads:
        t.start()
    if on_start is not None:
        on_start()
    began = time.monotonic()
    start.wait()
    for t in threads:
        t.join()
    return _total(states, time.monotonic() - began)


def _total(states: Sequence[_Worker], elapsed: float) -> DriverRun:
    latencies = sorted(v for s in states for v in s.latencies_us)
    errors = sum(s.errors for s in states)
    first = next((s.first_error for s in states if s.first_error), None)
    return DriverRun(
        len(latencies), errors, elapsed, latencies, sum(s.cpu_s for s in states), first
    )
