"""bench.side_by_side: two targets loaded at once on one CPU, CPU per call of each per window.
Shapes only (no timing assertions): a real do-nothing server pair and real h2load runs."""

from __future__ import annotations

import shutil

import pytest
from envoy.service.auth.v3 import external_auth_pb2 as ext

from bench import side_by_side
from bench.side_by_side import TOKEN_REQUEST_BYTES, Window, summary, token_sized_case


def test_the_token_sized_request_is_as_long_as_the_token_rows_and_shaped_like_them() -> None:
    case = token_sized_case()
    assert len(case.request) == TOKEN_REQUEST_BYTES  # type: ignore[union-attr]
    request = ext.CheckRequest.FromString(case.request)  # type: ignore[union-attr]
    http = request.attributes.request.http
    assert http.path == side_by_side.CHECKS
    scheme, token = http.headers["authorization"].split(" ")
    assert scheme == "Bearer" and token.count(".") == 2
    assert len(token_sized_case(1400).request) == 1400  # type: ignore[union-attr]


def test_summary_is_the_medians_of_the_windows() -> None:
    windows = [Window((100.0, 90.0), (200.0, 210.0)), Window((100.0, 100.0), (200.0, 200.0))]
    windows.append(Window((100.0, 95.0), (200.0, 204.0)))
    assert summary(windows) == {
        "cpu_us_b_minus_a": 4.0,
        "cpu_ratio_a_over_b": round(200 / 204, 3),
        "rps_ratio_b_over_a": 0.95,
    }


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load not installed")
def test_two_do_nothing_servers_side_by_side(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["ceiling", "bench.side_by_side:ceiling_token_request", "--swap"]
    argv += ["--windows", "2", "--duration", "0.3", "--server-cpu", "0", "--client-cpus", "0"]
    assert side_by_side.main(argv) == 0
    out = capsys.readouterr().out
    assert "A = ceiling, B = ceiling (token-sized request)" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:2] in ("0 ", "1 ")]
    assert len(rows) == 2
    for row in rows:
        assert float(row[3]) > 0 and float(row[7]) > 0  # µs per call, A and B
    assert "cpu_us_b_minus_a" in out
