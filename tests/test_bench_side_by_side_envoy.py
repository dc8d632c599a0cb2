"""bench.side_by_side_envoy: the Envoy row's pair (Envoy + sidecar, Envoy + do-nothing) loaded
at once on one CPU, each side's CPU per call split into its Envoy's and its ext_authz server's.
Shapes only (no timing assertions): a real control plane, sidecar, two real Envoys, real h2load."""

from __future__ import annotations

import shutil

import pytest

from bench import side_by_side_envoy
from bench.side_by_side import Window
from bench.side_by_side_envoy import envoy_and_authz, line, per_side, summary
from bench.targets import RunningTarget

# Sidecar's side: all 300, envoy 120, authz 180; do-nothing's: 280 = 118 + 162.
SIDECAR = (300.0, (120.0, 180.0), 1000.0)
CEILING = (280.0, (118.0, 162.0), 1100.0)


def window(sidecar_first: bool) -> Window:
    a, b = (SIDECAR, CEILING) if sidecar_first else (CEILING, SIDECAR)
    return Window((a[2], b[2]), (a[0], b[0]), (a[1], b[1]))


def test_the_envoy_is_the_first_pid_and_the_authz_server_the_rest() -> None:
    target = RunningTarget("envoy+sidecar", "http://x", [], [10, 20, 21])
    assert envoy_and_authz(target) == [[10], [20, 21]]


@pytest.mark.parametrize("sidecar_first", [True, False])
def test_windows_read_as_sidecar_and_do_nothing_whichever_started_first(
    sidecar_first: bool,
) -> None:
    w = window(sidecar_first)
    assert per_side(w, sidecar_first) == ((300.0, 120.0, 180.0), (280.0, 118.0, 162.0))
    row = line(0, w, sidecar_first).split()
    assert row[1:6] == ["S", "1000/s", "300.0", "120.0", "180.0"]
    assert row[6:11] == ["C", "1100/s", "280.0", "118.0", "162.0"]
    assert row[-3:] == ["+20.0", "+2.0", "+18.0"]


def test_summary_is_the_medians_over_both_orders() -> None:
    other = Window((900.0, 1000.0), (290.0, 300.0), ((118.0, 172.0), (120.0, 180.0)))
    windows = [(window(True), True), (window(False), False), (other, False)]
    assert summary(windows) == {
        "all_us_sidecar_minus_ceiling": 20.0,
        "envoy_us_sidecar_minus_ceiling": 2.0,
        "authz_us_sidecar_minus_ceiling": 18.0,
        "all_cpu_ratio_ceiling_over_sidecar": round(280 / 300, 3),
        "envoy_cpu_ratio_ceiling_over_sidecar": round(118 / 120, 3),
        "authz_cpu_ratio_ceiling_over_sidecar": round(162 / 180, 3),
        "rps_ratio_sidecar_over_ceiling": round(1000 / 1100, 3),
    }


@pytest.mark.envoy
@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load not installed")
@pytest.mark.parametrize("full", [False, True])
def test_the_envoy_pair_side_by_side_in_both_orders(
    full: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--windows", "1", "--duration", "0.3", "--server-cpu", "0", "--client-cpus", "0"]
    assert side_by_side_envoy.main(argv + (["--full"] if full else [])) == 0
    out = capsys.readouterr().out
    ceiling = "envoy+ceiling-full" if full else "envoy+ceiling"
    assert f"A = envoy+sidecar, B = {ceiling}" in out
    assert f"A = {ceiling}, B = envoy+sidecar" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("0 ")]
    assert len(rows) == 2  # one window per order
    for row in rows:
        side, ceiling_side = [float(v) for v in row[3:6]], [float(v) for v in row[8:11]]
        for all_us, envoy_us, authz_us in (side, ceiling_side):
            assert all_us > 0 and envoy_us > 0 and authz_us > 0
    assert "both orders:" in out and "authz_us_sidecar_minus_ceiling" in out
