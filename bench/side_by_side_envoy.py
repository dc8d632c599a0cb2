"""The Envoy row's pair side by side (bench.side_by_side's method): Envoy + sidecar and Envoy +
do-nothing, each its own Envoy, loaded at once on one server CPU, both sent the same request
(the row's allow: a valid key in ``authorization`` on the checks route; the do-nothing server
reads none of it). Per window each side's req/s and CPU µs per call of the whole side, of its
Envoy and of its ext_authz server; at the end the medians of sidecar - do-nothing.

    python -m bench.side_by_side_envoy --windows 10 --duration 3
    python -m bench.side_by_side_envoy --full   # the do-nothing answers the sidecar's allow
    python -m bench.side_by_side_envoy --full --audit-off   # and the sidecar keeps no records

A side started second was ≈ 1.5 % cheaper in one A/A run of bench.side_by_side, so the pair
runs in both start orders (``--order``), each its own start and windows, reported apart and
together. With ``--full`` the do-nothing server answers the sidecar's own allow (identity
headers, headers to remove, metadata; bench.envoy_targets.sidecar_allow_response): Envoy then
handles the same answer on both sides, and an Envoy difference left is not the answer's. With
``--audit-off`` the sidecar runs without decision records (``SPAUTH_SIDECAR_AUDIT=off``), to
price its audit pipeline in the same windows."""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from bench.envoy_targets import ceiling_behind_envoy, sidecar_allow_response, sidecar_behind_envoy
from bench.side_by_side import Window, measure, prepare
from bench.targets import RunningTarget, TargetEnv

SIDES = ("envoy+sidecar", "envoy+ceiling")
# Column groups of a side's CPU per call: the whole side, its Envoy, its ext_authz server.
PARTS = ("all", "envoy", "authz")


def envoy_and_authz(target: RunningTarget) -> Sequence[Sequence[int]]:
    """An Envoy row's processes as (its Envoy, the ext_authz server behind it): bench.envoy_targets
    lists Envoy's pid first."""
    return [target.pids[:1], target.pids[1:]]


def per_side(window: Window, sidecar_first: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(sidecar's, do-nothing's) CPU µs per call as (all, envoy, authz), whichever was A."""
    sides = [(window.cpu_us[i], *window.parts_us[i]) for i in (0, 1)]
    return (sides[0], sides[1]) if sidecar_first else (sides[1], sides[0])


def rps(window: Window, sidecar_first: bool) -> tuple[float, float]:
    """(sidecar's, do-nothing's) req/s."""
    return window.rps if sidecar_first else (window.rps[1], window.rps[0])


def summary(windows: Sequence[tuple[Window, bool]]) -> dict[str, float]:
    """Medians over ``(window, sidecar_first)``: sidecar - do-nothing in CPU µs per call of the
    whole side, of Envoy and of the ext_authz server; the do-nothing side's CPU per call over
    the sidecar side's (the row's figure: what the Envoy row's throughput ratio would be if
    CPU were all that decided it); and the sidecar side's req/s over the do-nothing side's
    (both share one CPU, so read the CPU figures first)."""
    sides = [per_side(w, first) for w, first in windows]
    out = {}
    for i, part in enumerate(PARTS):
        out[f"{part}_us_sidecar_minus_ceiling"] = round(
            statistics.median(s[i] - c[i] for s, c in sides), 1
        )
    for i, part in enumerate(PARTS):
        out[f"{part}_cpu_ratio_ceiling_over_sidecar"] = round(
            statistics.median(c[i] / s[i] for s, c in sides), 3
        )
    ratios = [s / c for s, c in (rps(w, first) for w, first in windows)]
    out["rps_ratio_sidecar_over_ceiling"] = round(statistics.median(ratios), 3)
    return out


def line(i: int, window: Window, sidecar_first: bool) -> str:
    """One window's row: each side's req/s and µs per call (all / envoy / authz), and S - C."""
    s, c = per_side(window, sidecar_first)
    s_rps, c_rps = rps(window, sidecar_first)

    def cols(us: Sequence[float]) -> str:
        return " ".join(f"{v:6.1f}" for v in us)

    delta = " ".join(f"{a - b:+6.1f}" for a, b in zip(s, c, strict=True))
    return f"  {i:2}  S {s_rps:6.0f}/s {cols(s)}   C {c_rps:6.0f}/s {cols(c)}   S-C {delta}"


def run_order(
    sidecar_first: bool, args: argparse.Namespace, client: set[int], workdir: Path
) -> list[tuple[Window, bool]] | None:
    """Start the pair in one order, measure its windows; None if a side did not answer."""
    env = TargetEnv(frozenset({args.server_cpu}), workdir)
    response = None
    if args.full:
        response = workdir / "sidecar-allow.bin"
        response.write_bytes(sidecar_allow_response())
    sidecar_env = {"SPAUTH_SIDECAR_AUDIT": "off"} if args.audit_off else {}
    with contextlib.ExitStack() as stack:
        started = {}
        for side in SIDES if sidecar_first else SIDES[::-1]:
            started[side] = stack.enter_context(
                sidecar_behind_envoy(env, sidecar_env)
                if side == SIDES[0]
                else ceiling_behind_envoy(env, response)
            )
        sidecar = started[SIDES[0]]
        # The same HTTP request on both sides: Envoy's CheckRequest then differs in nothing.
        ceiling = replace(started[SIDES[1]], cases=list(sidecar.cases))
        a, b = (sidecar, ceiling) if sidecar_first else (ceiling, sidecar)
        for t in (a, b):
            error = prepare(t, args.server_cpu, client, workdir)
            if error is not None:
                print(f"{t.name}: {error}", file=sys.stderr)
                return None
        print(f"A = {a.name}, B = {b.name} (load average {os.getloadavg()[0]:.1f})")
        windows = measure(
            a, b, windows=args.windows, duration=args.duration, client_cpus=client,
            workdir=workdir / ("s" if sidecar_first else "c"), parts=envoy_and_authz,
        )  # fmt: skip
    return [(w, sidecar_first) for w in windows]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.side_by_side_envoy", description=__doc__)
    parser.add_argument("--windows", type=int, default=10, help="per order")
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--server-cpu", type=int, default=(os.cpu_count() or 1) - 1)
    parser.add_argument("--client-cpus", default="0")
    parser.add_argument("--order", choices=["both", "sidecar-first", "ceiling-first"])
    parser.add_argument("--full", action="store_true", help="the do-nothing answers a full allow")
    parser.add_argument("--audit-off", action="store_true", help="the sidecar keeps no records")
    parser.set_defaults(order="both")
    args = parser.parse_args(argv)
    client = {int(c) for c in args.client_cpus.split(",")}
    orders = {"both": (True, False), "sidecar-first": (True,), "ceiling-first": (False,)}
    print("S = envoy+sidecar, C = envoy+ceiling; µs per call: all, envoy, authz")
    every: list[tuple[Window, bool]] = []
    for sidecar_first in orders[args.order]:
        workdir = Path(tempfile.mkdtemp(prefix="spauth-side-by-side-envoy-"))
        windows = run_order(sidecar_first, args, client, workdir)
        if windows is None:
            return 1
        for i, (w, first) in enumerate(windows):
            print(line(i, w, first))
        print("  medians:", summary(windows), f"(load average {os.getloadavg()[0]:.1f})")
        every += windows
    if len(orders[args.order]) > 1:
        print("both orders:", summary(every))
    return 0


if __name__ == "__main__":
    sys.exit(main())
