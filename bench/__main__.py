"""``python -m bench``: run the targets, print a table, write bench/results/*.json."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import oauth_endpoints, propagation, report
from bench.ceiling import MAX_WORKERS, SERVER_OPTIONS
from bench.cpu import default_cpu_split
from bench.runner import CaseResult, Settings, run_target
from bench.targets import (
    CEILING,
    DEFAULT_TARGETS,
    SERVER_ENV,
    RunningTarget,
    TargetEnv,
    TargetError,
    resolve,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _cpus(text: str) -> frozenset[int]:
    return frozenset(int(c) for c in text.split(","))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line flags; explicit --reps/--duration override --quick."""
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny durations, 1 rep (smoke test)")
    p.add_argument("--reps", type=int, help="saturation repetitions (median is reported)")
    p.add_argument("--duration", type=float, help="seconds per saturation repetition")
    p.add_argument("--rate", type=float, help="requests/s of the fixed-rate run (default 1000)")
    p.add_argument("--rate-duration", type=float, help="seconds of the fixed-rate run")
    p.add_argument(
        "--rate-pairs",
        type=int,
        metavar="N",
        help="fixed-rate runs of a row with a baseline, each right after a baseline run "
        "(default 3, 1 with --quick); the median difference and the spread are reported",
    )
    p.add_argument(
        "--serial-duration",
        type=float,
        help="seconds per one-at-a-time latency rep (targets with a reference, e.g. Envoy rows)",
    )
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    p.add_argument(
        "--target",
        action="append",
        dest="targets",
        metavar="NAME|MODULE:ATTR",
        help=f"target to run (repeatable; default {DEFAULT_TARGETS}); "
        f"'{CEILING}' always runs first",
    )
    p.add_argument("--server-cpus", type=_cpus, help="CPUs for the server, e.g. 1")
    p.add_argument("--client-cpus", type=_cpus, help="CPUs for h2load, e.g. 0")
    p.add_argument(
        "--wait-quiet",
        type=float,
        metavar="S",
        help="before each measured run wait up to S s for other processes to leave the CPUs idle",
    )
    p.add_argument("--keep-workdir", action="store_true", help="keep logs and h2load output")
    p.add_argument(
        "--unpaired",
        action="store_true",
        help="measure the ceiling once instead of before every saturation rep of other targets",
    )
    p.add_argument(
        "--no-oauth-endpoints",
        action="store_true",
        help="skip the OAuth token/introspection endpoint section",
    )
    p.add_argument(
        "--propagation-keys",
        type=int,
        metavar="K",
        help="keys revoked per propagation scenario (default 20, 2 with --quick; 0 = skip)",
    )
    return p.parse_args(argv)


def build_settings(args: argparse.Namespace, workdir: Path) -> Settings:
    """Settings from defaults, --quick, then explicit flags."""
    server, client = default_cpu_split()
    s = Settings(
        args.server_cpus or frozenset(server), args.client_cpus or frozenset(client), workdir
    )
    if args.quick:
        s = s.quick()
    overrides = {
        "reps": args.reps,
        "duration": args.duration,
        "rate": args.rate,
        "rate_duration": args.rate_duration,
        "rate_pairs": args.rate_pairs,
        "serial_duration": args.serial_duration,
        "quiet_wait": args.wait_quiet,
    }
    fields = s.describe() | {k: v for k, v in overrides.items() if v is not None}
    fields.update(server_cpus=s.server_cpus, client_cpus=s.client_cpus, workdir=workdir)
    return Settings(**fields)


def run_all(
    names: Sequence[str],
    settings: Settings,
    *,
    paired: bool = True,
    results: list[CaseResult] | None = None,
    after_target: Callable[[], None] = lambda: None,
) -> list[CaseResult]:
    """Start each target in turn and measure its cases; a target that fails to start is a row.
    The ceiling (``names[0]``) is measured first and, with ``paired``, kept running so every
    later saturation rep is paired with a ceiling rep taken just before it. Rows are appended to
    ``results`` as they come and ``after_target`` runs after each target (to save them)."""
    env = TargetEnv(settings.server_cpus, settings.workdir)
    results = [] if results is None else results
    with contextlib.ExitStack() as stack:
        ceiling: RunningTarget | None = None
        for spec in names:
            print(f"target {spec}", file=sys.stderr, flush=True)
            try:
                factory = resolve(spec)
                if spec == CEILING:
                    running = stack.enter_context(factory(env))
                    results += run_target(running, settings)
                    ceiling = running if paired else None
                else:
                    with factory(env) as running:
                        results += run_target(running, settings, ceiling)
            except TargetError as exc:
                results.append(CaseResult(spec, "(start)", "-", "-", "failed", str(exc)))
            except Exception as exc:  # a broken plug-in must not cost us the other rows
                error = f"{type(exc).__name__}: {exc}"
                results.append(CaseResult(spec, "(start)", "-", "-", "failed", error))
            after_target()
    return results


def document(
    results: list[CaseResult],
    settings: Settings,
    started: dt.datetime,
    sections: dict[str, dict[str, Any]] | None = None,
    *,
    complete: bool = True,
) -> dict[str, Any]:
    """The JSON document written to disk; ``sections`` (e.g. propagation) are added at the end,
    and one whose ``ok`` is false makes the document's ``ok`` false. ``complete`` is false in the
    partial documents written while the run goes on (and left behind if it crashes)."""
    ceiling = next((r for r in results if r.target == CEILING and r.status == "ok"), None)
    ceiling_rps = ceiling.saturation.get("rps") if ceiling else None
    report.add_ratios(results, ceiling_rps)
    return {
        "schema": report.SCHEMA_VERSION,
        "complete": complete,
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": report.machine_info(),
        "settings": settings.describe(),
        "ceiling": {
            "target": CEILING,
            "case": ceiling.case if ceiling else None,
            "rps": ceiling_rps,
            "env": ceiling.info.get("env") if ceiling else None,
        },
        "server_model": {
            "grpc": "sync server, one process",
            "max_workers": MAX_WORKERS,
            "options": dict(SERVER_OPTIONS),
            "env": dict(SERVER_ENV),
        },
        "ok": all(r.status == "ok" for r in results)
        and all(section.get("ok", True) for section in (sections or {}).values()),
        "results": report.rows(results),
        **(sections or {}),
    }


def _propagation(workdir: Path, keys: int) -> dict[str, Any] | None:
    return propagation.run(workdir / "propagation", keys) if keys > 0 else None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; exit status 1 when any case failed."""
    args = parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    workdir = Path(tempfile.mkdtemp(prefix="spauth-bench-"))
    settings = build_settings(args, workdir)
    # Keep this orchestrating process off the server's CPU too.
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, settings.client_cpus)
    names = [CEILING, *[t for t in (args.targets or DEFAULT_TARGETS) if t != CEILING]]
    keys = args.propagation_keys
    keys = (2 if args.quick else 20) if keys is None else keys
    sections: dict[str, dict[str, Any]] = {}
    results: list[CaseResult] = []
    stamp = started.strftime("%Y%m%dT%H%M%SZ")

    def save_partial() -> None:
        # A crash late in a long run must not cost the rows and sections already measured.
        partial = document(results, settings, started, sections, complete=False)
        report.write(partial, args.out, stamp)

    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            # After the load: it needs no quiet machine, but must not disturb one. --quick
            # measures nothing worth a quiet machine, so there it runs alongside the targets
            # (it is mostly process start-up: a third of the smoke test's time, run serially).
            alongside = pool.submit(_propagation, workdir, keys) if args.quick else None
            run_all(
                names,
                settings,
                paired=not args.unpaired,
                results=results,
                after_target=save_partial,
            )
            if not args.no_oauth_endpoints:
                sections[oauth_endpoints.SECTION] = oauth_endpoints.run(settings)
                save_partial()
            section = alongside.result() if alongside else _propagation(workdir, keys)
            if section is not None:
                sections["propagation"] = section
    finally:
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    doc = document(results, settings, started, sections)
    print(report.table(results))
    if oauth_endpoints.SECTION in sections:
        print(oauth_endpoints.table(sections[oauth_endpoints.SECTION]))
    if "propagation" in sections:
        print(propagation.table(sections["propagation"]))
    for path in report.write(doc, args.out, stamp):
        print(f"wrote {path}", file=sys.stderr)
    if args.keep_workdir:
        print(f"logs kept in {workdir}", file=sys.stderr)
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
