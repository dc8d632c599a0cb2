"""Two targets loaded at the same time on the same server CPU, each by its own h2load on the
client CPUs: CPU per call of each over the same windows, so the host's drift (±30 % rep to rep
on some hosts, which sequential A/B reps cannot see through) hits both alike.

    python -m bench.side_by_side sidecar sidecar-jwt --windows 10 --duration 3
    python -m bench.side_by_side ceiling bench.side_by_side:ceiling_token_request --swap

Each target is measured on its first case (a builtin name or ``module:attribute``, as
``python -m bench --target`` takes). Per window: each target's req/s and server CPU µs per call
(its process tree, /proc); at the end the medians of B - A (µs per call) and of A's CPU per
call over B's. Both servers share one CPU, so each runs at about half its usual rate and its
CPU per call is higher than at saturation alone: read the difference and the ratio, not the
absolute figures. A target started second was ≈ 1.5 % cheaper than the same target started
first in one A/A run here: ``--swap`` serves the two cases from the other target in every
second window (targets that answer any request alike, e.g. two do-nothing servers), else run
the pair in both orders. ``ceiling_token_request`` is the do-nothing server measured on a request
as long as the access-token rows' (bench/README.md, "The ceiling's request")."""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench import h2load
from bench.cases import Case, grpc_case, typical_headers
from bench.cpu import pin_tree, tree_cpu_seconds
from bench.runner import load_for
from bench.targets import RunningTarget, TargetEnv, ceiling, resolve

# The access-token rows' request length (bench.oauth_targets: a control plane's RS256 token in
# typical_headers on the checks route); the do-nothing server reads none of it.
TOKEN_REQUEST_BYTES = 1325
CHECKS = "/v1/workspaces/acme/checks"


def token_sized_case(size: int = TOKEN_REQUEST_BYTES) -> Case:
    """An allow request of exactly ``size`` bytes shaped like the token rows' (a bearer token of
    base64url characters on the checks route): what a do-nothing server receives from them."""
    for pad in range(size):
        case = grpc_case("token-sized", _headers(pad), "allow", path=CHECKS)
        if len(case.request) == size:
            return case
        if len(case.request) > size:
            break
    raise ValueError(f"no token-shaped request of {size} bytes")


def _headers(pad: int) -> dict[str, str]:
    return typical_headers(authorization="Bearer eyJ." + "a" * pad + ".sig")


@contextlib.contextmanager
def ceiling_token_request(env: TargetEnv) -> Iterator[RunningTarget]:
    """The do-nothing server, its case a request as long as the access-token rows'."""
    with ceiling(env) as running:
        yield replace(running, name="ceiling (token-sized request)", cases=[token_sized_case()])


# A target's processes in groups whose CPU is reported apart (Envoy, the ext_authz server).
Parts = Callable[[RunningTarget], Sequence[Sequence[int]]]


@dataclass(frozen=True)
class Window:
    """One window: each side's req/s and server CPU µs per call (all its processes), and with
    ``parts`` the CPU µs per call of each group of its processes."""

    rps: tuple[float, float]
    cpu_us: tuple[float, float]
    parts_us: tuple[tuple[float, ...], tuple[float, ...]] = field(default=((), ()))


def measure(
    a: RunningTarget,
    b: RunningTarget,
    *,
    windows: int,
    duration: float,
    client_cpus: set[int],
    workdir: Path,
    swap: bool = False,
    parts: Parts | None = None,
) -> list[Window]:
    """``windows`` windows of both targets loaded at once (A's first case to A, B's to B; with
    ``swap``, every second window sends A's case to B and B's to A, and the window is still
    reported as A's case, B's case). ``parts`` splits each side's CPU into groups of its
    processes (e.g. Envoy and the ext_authz server behind it)."""
    out = []
    for w in range(windows):
        crossed = swap and w % 2 == 1
        servers = (b, a) if crossed else (a, b)
        cases = (a.cases[0], b.cases[0])
        dirs = [workdir / f"{w}-{side}" for side in "ab"]
        for d in dirs:
            d.mkdir(parents=True)
        loads = [
            load_for(case, t.address, d) for case, t, d in zip(cases, servers, dirs, strict=True)
        ]
        groups = [[t.pids, *(parts(t) if parts else ())] for t in servers]
        before = [[tree_cpu_seconds(g) for g in side] for side in groups]
        done = _at_once(loads, dirs, duration, client_cpus)
        cpu = [
            [
                (tree_cpu_seconds(g) - spent) / run.done * 1e6
                for g, spent in zip(side, b, strict=True)
            ]
            for side, b, run in zip(groups, before, done, strict=True)
        ]
        split = (tuple(cpu[0][1:]), tuple(cpu[1][1:]))
        out.append(Window((done[0].rps, done[1].rps), (cpu[0][0], cpu[1][0]), split))
    return out


def _at_once(
    loads: Sequence[h2load.Load], dirs: Sequence[Path], duration: float, cpus: set[int]
) -> tuple[h2load.RunStats, h2load.RunStats]:
    """Both loads at once, one h2load each (4 connections of 16 streams, as the bench's)."""
    runs: list[h2load.RunStats | None] = [None, None]

    def run(i: int) -> None:
        runs[i] = h2load.saturate(
            loads[i], duration=duration, clients=4, streams=16, cpus=cpus, workdir=dirs[i]
        )

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if runs[0] is None or runs[1] is None:
        raise RuntimeError("a load generator failed (see its output in the work directory)")
    return runs[0], runs[1]


def summary(windows: Sequence[Window]) -> dict[str, float]:
    """Medians over the windows: B - A in CPU µs per call, A's CPU per call over B's, and B's
    req/s over A's."""
    return {
        "cpu_us_b_minus_a": round(statistics.median(w.cpu_us[1] - w.cpu_us[0] for w in windows), 1),
        "cpu_ratio_a_over_b": round(
            statistics.median(w.cpu_us[0] / w.cpu_us[1] for w in windows), 3
        ),
        "rps_ratio_b_over_a": round(statistics.median(w.rps[1] / w.rps[0] for w in windows), 3),
    }


def prepare(target: RunningTarget, server_cpu: int, client: set[int], workdir: Path) -> str | None:
    """Pin ``target`` to the server CPU, check its first case answers as expected (else say
    why) and warm it up for a second."""
    pin_tree(target.pids, {server_cpu})
    error = target.cases[0].verify(target.address)
    if error is None:
        warm = load_for(target.cases[0], target.address, workdir)
        h2load.saturate(warm, duration=1.0, clients=4, streams=16, cpus=client, workdir=workdir)
    return error


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.side_by_side", description=__doc__)
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--server-cpu", type=int, default=(os.cpu_count() or 1) - 1)
    parser.add_argument("--client-cpus", default="0")
    parser.add_argument("--swap", action="store_true", help="swap the cases every second window")
    args = parser.parse_args(argv)
    client = {int(c) for c in args.client_cpus.split(",")}
    workdir = Path(tempfile.mkdtemp(prefix="spauth-side-by-side-"))
    env = TargetEnv(frozenset({args.server_cpu}), workdir)
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(resolve(args.a)(env))
        b = stack.enter_context(resolve(args.b)(env))
        for t in (a, b):
            error = prepare(t, args.server_cpu, client, workdir)
            if error is not None:
                print(f"{t.name}: {error}", file=sys.stderr)
                return 1
        print(f"A = {a.name}, B = {b.name} (load average {os.getloadavg()[0]:.1f})")
        windows = measure(
            a, b, windows=args.windows, duration=args.duration, client_cpus=client,
            workdir=workdir, swap=args.swap,
        )  # fmt: skip
        for i, w in enumerate(windows):
            print(
                f"  {i:2}  A {w.rps[0]:7.0f}/s {w.cpu_us[0]:6.1f} µs   B {w.rps[1]:7.0f}/s "
                f"{w.cpu_us[1]:6.1f} µs   B-A {w.cpu_us[1] - w.cpu_us[0]:+6.1f}"
            )
        print("  medians:", summary(windows), f"(load average {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
