"""Machine description, the printed table and the JSON files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc
from google import protobuf

from bench import h2load
from bench.runner import NOISE_LIMIT, CaseResult

SCHEMA_VERSION = 1


def cpu_model() -> str:
    """The 'model name' line of /proc/cpuinfo."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def git_commit() -> str | None:
    """HEAD of the checkout we run from, with '+dirty' when there are local changes."""
    here = Path(__file__).parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def machine_info() -> dict[str, Any]:
    """What a reader needs to compare two result files."""
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": protobuf.__version__,
        "h2load": h2load.version(),
        "git_commit": git_commit(),
    }


def add_ratios(results: Sequence[CaseResult], ceiling_rps: float | None) -> None:
    """Set ``ratio_to_ceiling``: the median of the row's paired ratios (each rep over a ceiling
    rep run just before it) when it has them, else saturation rps / the ceiling row's."""
    for r in results:
        rps = r.saturation.get("rps")
        paired = r.saturation.get("paired_ratio")
        r.ratio_to_ceiling_same_request = r.saturation.get("same_request_paired_ratio")
        if paired is not None:
            r.ratio_to_ceiling = paired
        elif ceiling_rps and rps is not None:
            r.ratio_to_ceiling = round(rps / ceiling_rps, 3)


def _fmt(value: object, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _range(spread: Sequence[float] | None) -> str:
    """A pair-difference spread as ``min..max`` (``-`` without one)."""
    return "-" if not spread else f"{spread[0]:+.2f}..{spread[1]:+.2f}"


def table(results: Sequence[CaseResult]) -> str:
    """A fixed-width table of the headline numbers, then the one-at-a-time rows."""
    head = (
        f"{'target':<28} {'case':<20} {'req/s':>8} {'xceil':>6} {'p50ms':>7} {'p99ms':>7} "
        f"{'+p99ms':>7} {'+p99 spread':>13} {'p99.9ms':>8} {'srv us/call':>11} {'cli us/call':>11} "
        f"{'cp us/rec':>9} {'noise':>5}  status"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        s, f = r.saturation, r.fixed_rate
        lines.append(
            f"{r.target:<28.28} {r.case:<20.20} {_fmt(s.get('rps'), '8.0f')} "
            f"{_fmt(r.ratio_to_ceiling, '6.2f')} {_fmt(f.get('p50_ms'), '7.2f')} "
            f"{_fmt(f.get('p99_ms'), '7.2f')} {_fmt(f.get('added_p99_ms'), '+7.2f')} "
            f"{_range(f.get('added_p99_ms_spread')):>13} "
            f"{_fmt(f.get('p999_ms'), '8.2f')} "
            f"{_fmt(s.get('server_cpu_us_per_call'), '11.0f')} "
            f"{_fmt(s.get('client_cpu_us_per_call'), '11.0f')} "
            f"{_fmt(s.get('cp_cpu_us_per_record'), '9.1f')} "
            f"{_fmt(s.get('other_cpu_util'), '5.2f')}  "
            + (r.status if r.error is None else f"{r.status}: {r.error}")
        )
    noisy = [r for r in results if (r.saturation.get("other_cpu_util") or 0) > NOISE_LIMIT]
    if noisy:
        lines.append(
            f"WARNING: other processes used > {NOISE_LIMIT} CPU during {len(noisy)} row(s) "
            "('noise' column, in cores): rerun on a quiet machine before trusting them."
        )
    lines.append(
        "+p99ms: fixed-rate p99 minus that of the baseline run just before it (the row's "
        "reference, else the ceiling), the median over --rate-pairs such pairs, and +p99 spread "
        "the pairs' smallest and largest difference (bench/README.md, 'Reading p99 at a fixed "
        "rate'); cp us/rec: control-plane CPU per stored decision record."
    )
    lines += _reference_lines(results) + _same_request_lines(results)
    return "\n".join(lines + _serial_table(results))


def _rep_ratios(r: CaseResult, key: str) -> str:
    """Each saturation rep's rps over its paired run's (``key``), as printed."""
    reps = r.saturation.get("reps", [])
    return " ".join(f"{rep['rps'] / rep[key]:.2f}" for rep in reps if rep.get(key))


def _reference_lines(results: Sequence[CaseResult]) -> list[str]:
    """Rows with a reference: their saturation reps over a reference rep run just before each
    (the Envoy rows' own do-nothing counterpart), the median and every rep."""
    lines = []
    for r in results:
        ratio = r.saturation.get("reference_paired_ratio")
        if ratio is None:
            continue
        reps = _rep_ratios(r, "reference_rps")
        lines.append(
            f"{r.target + ' / ' + r.case:<36.36} ÷ its reference, rep by rep: {ratio:.2f} ({reps})"
        )
    return ["", *lines] if lines else []


def _same_request_lines(results: Sequence[CaseResult]) -> list[str]:
    """Rows whose request differs in size from the ceiling's: their saturation reps over a
    ceiling rep sent the row's own bytes just before each, the median and every rep."""
    lines = []
    for r in results:
        ratio = r.ratio_to_ceiling_same_request
        if ratio is None:
            continue
        each = _rep_ratios(r, "ceiling_same_request_rps")
        lines.append(
            f"{r.target + ' / ' + r.case:<36.36} ÷ the ceiling sent this row's "
            f"{r.request_bytes}-byte request, rep by rep: {ratio:.2f} ({each})"
        )
    if not lines:
        return []
    note = (
        "(xceil above is over the ceiling sent its own request; a longer request costs the "
        "do-nothing server more too: bench/README.md, 'The ceiling's request')"
    )
    return ["", *lines, note]


def _serial_table(results: Sequence[CaseResult]) -> list[str]:
    rows = [r for r in results if r.serial]
    if not rows:
        return []
    head = (
        f"{'one at a time (h2load -c1 -m1)':<36} {'p50ms':>7} {'p99ms':>7} "
        f"{'reference':<28} {'p50ms':>7} {'p99ms':>7} {'added p50':>9} {'added p99':>9}"
    )
    lines = ["", head, "-" * len(head)]
    for r in rows:
        v = r.serial
        lines.append(
            f"{r.target + ' / ' + r.case:<36.36} {_fmt(v['p50_ms'], '7.3f')} "
            f"{_fmt(v['p99_ms'], '7.3f')} {v['reference']:<28.28} "
            f"{_fmt(v['reference_p50_ms'], '7.3f')} {_fmt(v['reference_p99_ms'], '7.3f')} "
            f"{_fmt(v['added_p50_ms'], '+9.3f')} {_fmt(v['added_p99_ms'], '+9.3f')}"
        )
    lines.append("added: median over reps of (row - reference run just before it), ms.")
    return lines


def write(document: dict[str, Any], out_dir: Path, stamp: str) -> list[Path]:
    """Write ``<stamp>.json`` and ``latest.json`` into ``out_dir``; return both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(document, indent=2, sort_keys=False) + "\n"
    paths = [out_dir / f"{stamp}.json", out_dir / "latest.json"]
    for path in paths:
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(text)
        tmp.replace(path)  # never leave a half-written latest.json behind
    return paths


def rows(results: Sequence[CaseResult]) -> list[dict[str, Any]]:
    """Results as JSON-ready dicts."""
    return [asdict(r) for r in results]
