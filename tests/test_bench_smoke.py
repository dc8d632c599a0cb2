"""Smoke test of the benchmark: it runs end to end and writes well-formed results.

No timing assertions: the machine is noisy; we only check shape and positivity.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bench import h2load, report
from bench.cases import grpc_case, grpc_frame, typical_headers
from bench.runner import SAME_REQUEST_MIN_BYTES, Settings, run_target, same_request_load
from bench.targets import RunningTarget, TargetEnv, ceiling, ceiling_cases

ROOT = Path(__file__).resolve().parent.parent

needs_h2load = pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load not installed")


# One quick run serves every shape check below: the ceiling, the JWT rows, Envoy + sidecar (its
# reference, one-at-a-time latency, control-plane CPU per record), a two-worker sidecar, the
# OAuth endpoint section and the propagation section (both run by default). One run, not one per
# feature: starting processes is most of a quick run's time.
QUICK_TARGETS = ("ceiling", "sidecar-jwt", "sidecar-jwt-nocache", "envoy+sidecar")
QUICK_TARGETS += ("sidecar-workers-2",)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    if shutil.which("h2load") is None:
        pytest.skip("h2load not installed")
    out = tmp_path_factory.mktemp("bench") / "results"
    targets = [arg for name in QUICK_TARGETS for arg in ("--target", name)]
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "bench", "--quick", *targets, "--out", str(out)),
            # A rate a loaded CI machine sustains through Envoy too: at 1,000/s, with the other
            # pytest worker busy, requests queued past the end of the fixed-rate run.
            *("--rate", "200"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout


def _row(doc: dict[str, Any], target: str) -> dict[str, Any]:
    rows: list[dict[str, Any]] = [r for r in doc["results"] if r["target"] == target]
    assert len(rows) == 1, target
    return rows[0]


@needs_h2load
def test_quick_run_writes_complete_json(quick_run: tuple[Path, str]) -> None:
    out, stdout = quick_run
    assert "ceiling" in stdout  # the table

    latest = json.loads((out / "latest.json").read_text())
    stamped = [p for p in out.glob("*.json") if p.name != "latest.json"]
    assert len(stamped) == 1
    assert json.loads(stamped[0].read_text()) == latest

    assert latest["ok"] is True
    machine = latest["machine"]
    assert machine["nproc"] >= 1
    for key in ("cpu_model", "python", "grpcio", "h2load"):
        assert machine[key]
    assert latest["ceiling"]["rps"] > 0
    assert latest["settings"]["rate_pairs"] == 1  # --quick: one fixed-rate pair

    assert [r["target"] for r in latest["results"]] == list(QUICK_TARGETS)
    row = _row(latest, "ceiling")
    assert (row["case"], row["status"]) == ("allow", "ok")
    assert row["ratio_to_ceiling"] == 1.0
    sat, rate = row["saturation"], row["fixed_rate"]
    for key in ("rps", "server_cpu_us_per_call", "client_cpu_us_per_call"):
        assert sat[key] > 0, key
    assert len(sat["reps"]) == 1
    for key in ("achieved_rps", "p50_ms", "p99_ms", "p999_ms", "client_cpu_us_per_call"):
        assert rate[key] > 0, key
    assert rate["p50_ms"] <= rate["p99_ms"] <= rate["p999_ms"] <= rate["max_ms"]
    assert sat["unexpected"] == rate["unexpected"] == 0
    # The ceiling is its own baseline: no differences, no one-at-a-time runs, no records.
    assert "baseline" not in rate and row["serial"] == {}
    assert row["ratio_to_ceiling_same_request"] is None
    assert "same_request_paired_ratio" not in sat
    assert "reference_paired_ratio" not in sat and "reference_rps" not in sat["reps"][0]
    assert not [key for key in sat if key.startswith("cp_")]


@needs_h2load
def test_quick_run_has_jwt_rows(quick_run: tuple[Path, str]) -> None:
    latest = json.loads((quick_run[0] / "latest.json").read_text())
    for target, case, env in (
        ("sidecar-jwt", "jwt-cached", {}),
        ("sidecar-jwt-nocache", "jwt-cold", {"SPAUTH_SIDECAR_TOKEN_CACHE_SIZE": "0"}),
    ):
        row = _row(latest, target)
        assert (row["case"], row["expect"], row["status"]) == (case, "allow", "ok")
        assert row["ratio_to_ceiling"] > 0
        assert row["saturation"]["rps"] > 0
        assert row["saturation"]["unexpected"] == row["fixed_rate"]["unexpected"] == 0
        # Each rep is paired with a ceiling rep run just before it; the ratio is their median.
        (rep,) = row["saturation"]["reps"]
        assert rep["ceiling_rps"] > 0 and rep["ceiling_server_cpu_us_per_call"] > 0
        assert row["ratio_to_ceiling"] == row["saturation"]["paired_ratio"]
        assert row["ratio_to_ceiling"] == round(rep["rps"] / rep["ceiling_rps"], 3)
        assert env.items() <= row["info"]["env"].items()
        # The fixed-rate run is paired with a ceiling run at the same rate just before it.
        rate = row["fixed_rate"]
        base = rate["baseline"]
        assert base["target"] == "ceiling"
        assert base["achieved_rps"] > 0 and 0 < base["p50_ms"] <= base["p99_ms"]
        assert rate["added_p50_ms"] == round(rate["p50_ms"] - base["p50_ms"], 3)
        assert rate["added_p99_ms"] == round(rate["p99_ms"] - base["p99_ms"], 3)
        # One pair (--quick): its difference is the median and both ends of the spread.
        (pair,) = rate["pairs"]
        assert pair["added_p99_ms"] == rate["added_p99_ms"]
        assert rate["added_p99_ms_spread"] == [rate["added_p99_ms"]] * 2
        assert pair["baseline"]["p99_ms"] == base["p99_ms"]
        assert pair["target"]["requests"] == rate["requests"] > 0
        # The sidecar said which Check path it runs; its control plane's CPU per record is
        # metered from its own counters, cross-checked by the database's count.
        assert row["info"]["check_path"] in ("compiled", "python")
        _assert_metered(row["saturation"])
        # A token request is ≈ 800 bytes longer than the ceiling's: each rep also follows a
        # ceiling rep sent the row's own bytes, reported beside (not instead of) the ratio.
        assert row["request_bytes"] - latest["results"][0]["request_bytes"] > 500
        assert rep["ceiling_same_request_rps"] > 0
        assert rep["ceiling_same_request_server_cpu_us_per_call"] > 0
        same = row["saturation"]["same_request_paired_ratio"]
        assert same == round(rep["rps"] / rep["ceiling_same_request_rps"], 3)
        assert row["ratio_to_ceiling_same_request"] == same


@needs_h2load
def test_quick_run_has_envoy_sidecar_row_with_its_reference(quick_run: tuple[Path, str]) -> None:
    out, stdout = quick_run
    assert "one at a time" in stdout and "cp us/rec" in stdout  # the tables' new parts
    row = _row(json.loads((out / "latest.json").read_text()), "envoy+sidecar")
    assert (row["case"], row["kind"], row["status"]) == ("allow", "http", "ok")

    # One request at a time, alternating with Envoy + do-nothing running alongside.
    serial = row["serial"]
    assert (serial["clients"], serial["streams"]) == (1, 1)
    assert serial["reference"] == "envoy+ceiling (reference)"
    assert serial["unexpected"] == 0
    (rep,) = serial["reps"]  # --quick: one rep
    for side in ("target", "reference"):
        assert rep[side]["requests"] > 0, side
        assert 0 < rep[side]["p50_ms"] <= rep[side]["p99_ms"] <= rep[side]["max_ms"], side
    assert serial["p50_ms"] == rep["target"]["p50_ms"]
    assert serial["reference_p99_ms"] == rep["reference"]["p99_ms"]
    assert serial["added_p50_ms"] == round(rep["target"]["p50_ms"] - rep["reference"]["p50_ms"], 3)
    assert serial["added_p99_ms"] == round(rep["target"]["p99_ms"] - rep["reference"]["p99_ms"], 3)
    # Each saturation rep also follows a rep of the reference: Envoy + sidecar over Envoy +
    # do-nothing, seconds apart (the gRPC ceiling's pairing stays as it was).
    sat = row["saturation"]
    (rep,) = sat["reps"]
    assert rep["reference_rps"] > 0 and rep["reference_server_cpu_us_per_call"] > 0
    assert rep["ceiling_rps"] > 0
    assert sat["reference_paired_ratio"] == round(rep["rps"] / rep["reference_rps"], 3)
    assert row["ratio_to_ceiling"] == sat["paired_ratio"]
    assert "envoy+sidecar / allow" in stdout and "÷ its reference, rep by rep" in stdout
    # The fixed-rate run's baseline is the same reference, not the gRPC ceiling.
    rate = row["fixed_rate"]
    assert rate["baseline"]["target"] == "envoy+ceiling (reference)"
    assert rate["added_p99_ms"] == round(rate["p99_ms"] - rate["baseline"]["p99_ms"], 3)

    assert row["info"]["ext_authz_timeout"] == "5s"
    assert row["info"]["check_path"] in ("compiled", "python")
    _assert_metered(row["saturation"])


def _assert_metered(sat: dict[str, Any]) -> None:
    """The control plane stored one decision record per check of the rep before it was read,
    by its /metrics counters, and its database holds the same number."""
    (rep,) = sat["reps"]
    assert rep["cp_settled"] is True
    assert rep["cp_records"] >= rep["requests"] > 0
    assert rep["cp_db_records"] == rep["cp_records"]
    assert rep["cp_refused"] == {}
    # The process CPU clock ticks every 10 ms: a --quick rep can see no tick at all.
    assert rep["cp_cpu_us_per_record"] >= 0 and rep["cp_cpu_util"] >= 0
    assert sat["cp_cpu_us_per_record"] == rep["cp_cpu_us_per_record"]
    assert 0 <= rep["cp_ingest_cpu_us_per_record"] <= rep["cp_cpu_us_per_record"]
    assert sat["cp_background_cpu_util"] == rep["cp_background_cpu_util"] >= 0
    assert sat["cp_records"] == sat["cp_db_records"] == rep["cp_records"]


@needs_h2load
def test_quick_run_has_oauth_endpoint_section(quick_run: tuple[Path, str]) -> None:
    out, stdout = quick_run
    assert "oauth endpoint" in stdout  # its table
    section = json.loads((out / "latest.json").read_text())["oauth_endpoints"]
    assert section["ok"] is True
    rows = section["rows"]
    assert [(r["endpoint"], r["driver"]) for r in rows] == [
        ("token: authorization_code", "python"),
        ("token: refresh_token", "python"),
        ("token: refresh_token", "python"),
        ("introspect", "python"),
        ("introspect", "h2load"),
    ]
    assert rows[2]["clients"] == 2 * rows[1]["clients"]  # the driver-is-not-the-limit check
    for r in rows:
        assert (r["status"], r["error"], r["errors"]) == ("ok", None, 0), r
        for key in ("requests", "rps", "p50_ms", "server_cpu_us_per_call"):
            assert r[key] > 0, (r["endpoint"], key)
        assert r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert r["client_cpu_us_per_call"] > 0
        assert r["client_cpu_util"] > 0


@needs_h2load
def test_quick_run_has_workers_and_propagation(quick_run: tuple[Path, str]) -> None:
    # Shape only: a multi-process target reports each process's CPU, and the propagation
    # section has one well-formed row per scenario (Redis may be missing: then it is skipped).
    out, stdout = quick_run
    assert "revocation propagation" in stdout
    latest = json.loads((out / "latest.json").read_text())

    (row,) = [r for r in latest["results"] if r["target"] == "sidecar-workers-2"]
    assert (row["case"], row["status"]) == ("allow", "ok")
    assert row["info"]["workers"] == 2
    assert row["info"]["clients"] == 8
    (rep,) = row["saturation"]["reps"]
    by_process = rep["server_cpu_util_by_process"]
    assert len(by_process) == 5  # the supervisor, two workers and each worker's control-plane link
    assert all(p["cpu_util"] >= 0 for p in by_process)

    section = latest["propagation"]
    assert section["ok"] is True
    assert section["poll_interval_ms"] == 1.0
    names = [s["scenario"] for s in section["scenarios"]]
    assert names == ["one-control-plane", "two-replicas+redis", "two-replicas-no-bus"]
    for scenario in section["scenarios"]:
        if scenario["status"] == "skipped":
            assert scenario["redis"] and "redis-server not found" in scenario["error"]
            continue
        assert scenario["status"] == "ok", scenario
        assert scenario["pairs"] == scenario["keys"] * scenario["sidecars"]
        assert 0 < scenario["p50_ms"] <= scenario["p99_ms"] <= scenario["max_ms"]
        assert sum(scenario["deny_codes"].values()) == scenario["pairs"]
        assert [s["sidecar"] for s in scenario["per_sidecar"]] == ["s0", "s1", "s2"]
        homes = {"A", "B"} if scenario["control_planes"] == 2 else {"A"}
        assert set(scenario["by_control_plane"]) == homes


@needs_h2load
def test_wrong_expected_outcome_fails_the_case(tmp_path: Path) -> None:
    # The ceiling allows everything, so a case that expects a deny must fail verification
    # (h2load alone would never notice: it only sees HTTP 200).
    settings = Settings(frozenset({0}), frozenset({0}), tmp_path).quick()
    env = TargetEnv(settings.server_cpus, tmp_path)
    with ceiling(env) as running:
        deny = grpc_case("expects deny", typical_headers(), "deny")
        (result,) = run_target(replace(running, cases=[deny]), settings)
    assert result.status == "failed"
    assert result.error is not None
    assert "expected deny" in result.error
    assert result.saturation == {}


def test_only_a_request_of_another_size_gets_a_same_request_ceiling(tmp_path: Path) -> None:
    settings = Settings(frozenset({0}), frozenset({0}), tmp_path)
    running = RunningTarget("ceiling", "127.0.0.1:50051", ceiling_cases(), [])
    own = len(running.cases[0].request)  # type: ignore[union-attr]
    padded = [grpc_case("padded", typical_headers(x_pad="p" * n), "allow") for n in range(400)]
    near = [c for c in padded if len(c.request) - own < SAME_REQUEST_MIN_BYTES]
    longer = next(c for c in padded if len(c.request) - own >= SAME_REQUEST_MIN_BYTES)
    assert len(near[-1].request) - own == SAME_REQUEST_MIN_BYTES - 1
    assert same_request_load(near[-1], running, settings) is None
    assert same_request_load(running.cases[0], running, settings) is None
    load = same_request_load(longer, running, settings)
    # The ceiling's address, the row's own bytes.
    assert load is not None and load.url.startswith("http://127.0.0.1:50051/")
    assert load.body_file is not None and load.body_file.read_bytes() == longer.body()


@needs_h2load
def test_a_longer_request_is_also_paired_with_the_ceiling_sent_it(tmp_path: Path) -> None:
    settings = Settings(frozenset({0}), frozenset({0}), tmp_path).quick()
    with ceiling(TargetEnv(settings.server_cpus, tmp_path)) as running:
        big = grpc_case("big", typical_headers(x_pad="p" * 800), "allow")
        small = grpc_case("small", typical_headers(x_pad="p"), "allow")
        target = replace(running, name="row", cases=[big, small])
        big_row, small_row = run_target(target, settings, running)
    report.add_ratios([big_row, small_row], None)
    (rep,) = big_row.saturation["reps"]
    assert rep["ceiling_rps"] > 0 and rep["ceiling_same_request_rps"] > 0
    assert rep["ceiling_same_request_server_cpu_us_per_call"] > 0
    same = round(rep["rps"] / rep["ceiling_same_request_rps"], 3)
    assert big_row.ratio_to_ceiling_same_request == same
    assert big_row.saturation["same_request_paired_ratio"] == same
    # The usual ratio is unchanged: over the ceiling sent its own request.
    assert big_row.ratio_to_ceiling == round(rep["rps"] / rep["ceiling_rps"], 3)
    assert small_row.ratio_to_ceiling_same_request is None
    assert "ceiling_same_request_rps" not in small_row.saturation["reps"][0]
    lines = [
        x for x in report.table([big_row, small_row]).splitlines() if "÷ the ceiling sent" in x
    ]
    assert len(lines) == 1 and lines[0].startswith("row / big")
    assert f"this row's {big_row.request_bytes}-byte request, rep by rep: {same:.2f}" in lines[0]


def test_grpc_frame_prefix() -> None:
    assert grpc_frame(b"abc") == b"\x00\x00\x00\x00\x03abc"


def test_split_rate_sums_to_total_and_keeps_one_request_per_tick() -> None:
    rates = h2load.split_rate(1000)
    assert sum(rates) == pytest.approx(1000, abs=0.05)
    assert max(rates) <= 100  # h2load's tick is 10 ms: above 100/s it sends bursts
    assert len(set(rates)) == len(rates)


def test_percentile_nearest_rank() -> None:
    values = list(range(1, 1001))
    assert h2load.percentile(values, 0.5) == 500
    assert h2load.percentile(values, 0.99) == 990
    assert h2load.percentile(values, 0.999) == 999
    assert h2load.percentile([7], 0.999) == 7


def test_parse_summary_counts_unexpected_statuses() -> None:
    text = (
        "finished in 5.00s, 7817.00 req/s, 969.31KB/s\n"
        "requests: 39085 total, 39090 started, 39085 done, 39085 succeeded, 0 failed, "
        "0 errored, 0 timeout\n"
        "status codes: 39080 2xx, 0 3xx, 5 4xx, 0 5xx\n"
    )
    assert h2load.parse_summary(text, range(200, 300)) == (7817.0, 39085, 5)
    assert h2load.parse_summary(text, range(400, 500)) == (7817.0, 39085, 39080)
    with pytest.raises(ValueError, match="not understood"):
        h2load.parse_summary("connect failed", range(200, 300))


def test_parse_summary_reads_a_run_that_answered_nothing() -> None:
    # Printed by a 0.1 s warm-up on a loaded CI machine: the time is in microseconds.
    text = (
        "finished in 9us, 0.00 req/s, 3.59KB/s\n"
        "requests: 0 total, 128 started, 0 done, 0 succeeded, 0 failed, 0 errored, 0 timeout\n"
        "status codes: 0 2xx, 0 3xx, 0 4xx, 0 5xx\n"
    )
    assert h2load.parse_summary(text, range(200, 300)) == (0.0, 0, 0)
    assert h2load.parse_summary(text.replace("9us", "412.5ms"), range(200, 300)) == (0.0, 0, 0)


def test_a_timed_run_that_answers_nothing_is_retried_then_refused(tmp_path: Path) -> None:
    """A server that accepts and never answers: saturate() runs h2load EMPTY_RUN_TRIES times
    (one connection each), then refuses to return a run that measured nothing."""
    if shutil.which("h2load") is None:
        pytest.skip("h2load not installed")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    held: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                held.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    load = h2load.Load(f"http://127.0.0.1:{port}/", [], None)
    cpus = set(os.sched_getaffinity(0))
    try:
        with pytest.raises(RuntimeError, match="answered nothing in 3 runs"):
            h2load.saturate(load, duration=0.2, clients=1, streams=1, cpus=cpus, workdir=tmp_path)
    finally:
        listener.close()
        for conn in held:
            conn.close()
    assert len(held) == h2load.EMPTY_RUN_TRIES
