"""`bench.syscalls` reads `strace -c` summaries (with and without an errors column) and prints
calls per request side by side."""

from __future__ import annotations

from bench.syscalls import parse_summary, per_request, table

SUMMARY = """\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 74.55    1.813731         223      8131           epoll_wait
 20.45    0.497607      124401         4         4 futex
  2.38    0.057964           7      8010      4004 readv
  1.45    0.035374          17      2000           writev
  1.15    0.027998          13      2007           sendto
  0.00    0.000013          13         1         1 restart_syscall
------ ----------- ----------- --------- --------- ----------------
100.00    2.432990         120     20153      4009 total
"""


def test_a_summary_gives_calls_per_system_call_whatever_its_errors() -> None:
    assert parse_summary(SUMMARY) == {
        "epoll_wait": 8131,
        "futex": 4,
        "readv": 8010,
        "writev": 2000,
        "sendto": 2007,
        "restart_syscall": 1,
    }
    assert parse_summary("strace: Process 1 detached\n") == {}


def test_per_request_sums_every_call_into_total() -> None:
    rows = per_request(parse_summary(SUMMARY), 2000)
    assert rows["readv"] == 4.005 and rows["futex"] == 0.002
    assert rows["total"] == 20153 / 2000


def test_the_table_shows_calls_either_side_makes_often_and_total_last() -> None:
    left = {"readv": 4.0, "sendto": 2.0, "futex": 0.01, "total": 6.01}
    right = {"readv": 4.0, "writev": 1.0, "sendto": 1.0, "total": 6.0}
    lines = table({"a": left, "b": right})
    names = [line.split()[0] for line in lines[1:]]
    assert names == ["readv", "sendto", "writev", "total"]  # futex: under one call in 20
    assert lines[3].split() == ["writev", "0.00", "1.00"]
    assert lines[0].split() == ["syscall", "a", "b"]
