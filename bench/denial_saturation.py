"""The sidecar's CPU per check at saturation, case by case, through gRPC
(``python -m bench.denial_saturation``): ``bench.denial_cost:sidecar_counted`` (the sidecar as
shipped, failures counted, no source ever blocked) started once, its process tree pinned to
the server CPU, then closed-loop h2load runs of each case (allow, unknown key, wrong scope) in
rounds whose order rotates, so that no case always runs after another (a case's records still
being written or shipped when the next starts land on the next one's bill). Each run prints
the tree's CPU µs per answered check, by process (the sidecar, its control-plane link).

The bench's own saturation column runs each row once, always in the same order (allow, then
unknown key, then wrong scope), and its one 2 s rep moves by ±15 % with the machine; this
repeats the runs, rotated, in one sidecar. Not a test: timings on a shared machine are noise;
nothing asserts on them."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import h2load
from bench.cpu import pin_tree, tree_cpu_by_process
from bench.denial_cost import sidecar_counted
from bench.runner import load_for
from bench.targets import TargetEnv

SERVER_CPU, CLIENT_CPU = 0, 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.denial_saturation", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="rotations of the case order")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per run")
    parser.add_argument("--pause", type=float, default=2.0, help="idle seconds before each run")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--streams", type=int, default=16)
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="denial-saturation-"))
    env = TargetEnv(frozenset({SERVER_CPU}), workdir)
    per_call: dict[str, list[float]] = {}
    with sidecar_counted(env) as target:
        pin_tree(target.pids, {SERVER_CPU})
        loads = {case.name: load_for(case, target.address, workdir) for case in target.cases}
        names = list(loads)

        def run(name: str, duration: float) -> tuple[float, dict[int, float]]:
            before = tree_cpu_by_process(target.pids)
            done = h2load.saturate(
                loads[name],
                duration=duration,
                clients=args.clients,
                streams=args.streams,
                cpus={CLIENT_CPU},
                workdir=workdir,
            )
            after = tree_cpu_by_process(target.pids)
            calls = max(done.done, 1)
            return done.rps, {p: (after[p] - before.get(p, 0.0)) / calls * 1e6 for p in after}

        for name in names:  # warm-up, not measured
            run(name, 1.0)
        for rnd in range(args.rounds):
            shift = rnd % len(names)
            for name in names[shift:] + names[:shift]:
                time.sleep(args.pause)
                rps, by_pid = run(name, args.duration)
                total = sum(by_pid.values())
                per_call.setdefault(name, []).append(total)
                pids = ", ".join(f"{pid} {us:.1f}" for pid, us in by_pid.items())
                print(f"round {rnd} {name:12} {rps:7.0f}/s  {total:6.1f} µs/check  ({pids})")
    print("median µs of the sidecar's tree per check: " + ", ".join(
        f"{name} {statistics.median(v):.1f} ({min(v):.0f}..{max(v):.0f})"
        for name, v in per_call.items()
    ))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
