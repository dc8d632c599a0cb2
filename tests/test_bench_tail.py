"""bench.tail: what ran on a CPU while each request waited (perf sched's slices overlaid on the
requests), every thread's CPU per run from schedstat, collections logged with their generation,
and a run end to end against the do-nothing server."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from bench.tail import (
    attribute,
    classify,
    log_collections,
    parse_timehist,
    read_sched,
    thread_use,
)
from tests.support.lockstep import lockstep_child
from tests.test_bench_smoke import needs_h2load

ROOT = Path(__file__).resolve().parent.parent

# ``perf sched timehist`` as it prints (end time, [cpu], task[tid/pid], wait, delay, run in ms).
TIMEHIST = """\
           time    cpu  task name                       wait time  sch delay   run time
                        [tid/pid]                          (msec)     (msec)     (msec)
--------------- ------  ------------------------------  ---------  ---------  ---------
     100.000400 [0000]  spauth-rpc_0[501/500]               0.000      0.000      0.400
     100.001000 [0000]  audit-shipper[505/500]              0.000      0.000      0.600
     100.001200 [0000]  python[600/600]                     0.000      0.000      0.200
     100.001300 [0001]  h2load[700/700]                     0.000      0.000      1.300
     100.001500 [0000]  <idle>                              0.000      0.000      0.300
     100.001600 [0000]  kworker/0:1-eve[30]                 0.000      0.000      0.100
"""


def test_timehist_lines_become_slices() -> None:
    slices = parse_timehist(TIMEHIST)
    assert [(s.cpu, s.tid, s.pid, s.name) for s in slices] == [
        (0, 501, 500, "spauth-rpc_0"),
        (0, 505, 500, "audit-shipper"),
        (0, 600, 600, "python"),
        (1, 700, 700, "h2load"),
        (0, 0, 0, "<idle>"),
        (0, 30, 30, "kworker/0:1-eve"),
    ]
    assert abs(slices[1].start - 100.0004) < 1e-9 and slices[1].end == 100.001


def test_each_request_gets_the_time_each_kind_of_task_ran_during_it() -> None:
    slices = parse_timehist(TIMEHIST)
    kinds = {
        i: classify(s, root=500, tree={500, 600}, client={700}, rpc={"spauth-rpc"})
        for i, s in enumerate(slices)
    }
    assert list(kinds.values()) == [
        "rpc", "own:audit-shipper", "child:python", "h2load", "idle", "others"
    ]  # fmt: skip
    # One request during the shipper's run and the child's, one before anything ran.
    requests = [(100.0005, 100.0011), (99.0, 99.5)]
    during, before = attribute(requests, slices, kinds, cpu=0)
    assert {k: round(v) for k, v in during.items()} == {
        "own:audit-shipper": 500,
        "child:python": 100,
    }
    assert before == {}
    on_client_cpu = attribute(requests, slices, kinds, cpu=1)[0]
    assert {k: round(v) for k, v in on_client_cpu.items()} == {"h2load": 600}


def test_a_busy_thread_shows_under_its_name_with_its_cpu_and_runs(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import sys, threading, time
        from bench.wakeups import name_threads
        name_threads()
        def burner():
            for line in sys.stdin:
                if line == "go\\n":
                    end = time.thread_time() + 0.05
                    while time.thread_time() < end:
                        pass
                sys.stdout.write(line)
                sys.stdout.flush()
        t = threading.Thread(target=burner)
        t.start()
        t.join()
        """
    )
    with lockstep_child(code) as (pid, say):
        say(b"warm\n")
        before = read_sched(pid)
        say(b"go\n")
        after = read_sched(pid)
    rows = {row.name: row for row in thread_use(before, after, 1.0)}
    assert rows["burner"].threads == 1
    assert rows["burner"].cpu_ms_s >= 50  # it burnt 50 ms of its own CPU time
    assert rows["burner"].runs_s >= 1


def test_collections_are_logged_with_their_generation(tmp_path: Path) -> None:
    log = tmp_path / "gc.log"
    stop = log_collections(log)
    try:
        started = time.monotonic()
        gc.collect(1)
        gc.collect(2)
    finally:
        stop()
    lines = [line.split() for line in log.read_text().splitlines()]
    assert [int(gen) for _, gen, _, _ in lines][-2:] == [1, 2]
    assert all(float(at) >= started for at, _, _, _ in lines[-2:])
    assert lines[-1][3] == "MainThread"


@needs_h2load
def test_a_run_against_the_do_nothing_server_reports_its_distribution(tmp_path: Path) -> None:
    out = tmp_path / "tail.json"
    argv = [sys.executable, "-m", "bench.tail", "--target", "nothing", "--rounds", "1",
            "--duration", "0.5", "--rate", "200", "--json", str(out)]  # fmt: skip
    subprocess.run(argv, cwd=ROOT, check=True, capture_output=True, timeout=120)
    (run,) = json.loads(out.read_text())["nothing"]
    assert 0 < run["p50"] <= run["p99"] <= run["p999"] <= run["max"]
    threads = {t["name"] for t in run["threads"]}
    assert "_serve" in threads  # grpc's poller, named by what it runs
