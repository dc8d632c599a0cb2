"""bench.wakeups: per-thread context switches read from /proc, threads named by what they run,
and the finding it was built for (an idle outgoing stream adds a polling thread that wakes)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from bench.wakeups import deltas, read_threads
from tests.support.lockstep import lockstep_child
from tests.test_bench_smoke import needs_h2load

ROOT = Path(__file__).resolve().parent.parent

# A process whose thread ``naps`` (named by bench.wakeups.name_threads) sleeps 50 times when
# told to: every sleep blocks, a voluntary switch of that thread.
_NAPS = textwrap.dedent(
    """
    import sys, threading, time
    from bench.wakeups import name_threads
    name_threads()
    def naps():
        for line in sys.stdin:
            if line == "go\\n":
                for _ in range(50):
                    time.sleep(0.001)
            sys.stdout.write(line)
            sys.stdout.flush()
    t = threading.Thread(target=naps)
    t.start()
    t.join()
    """
)


def test_a_threads_sleeps_are_counted_under_the_name_of_what_it_runs() -> None:
    with lockstep_child(_NAPS) as (pid, say):
        say(b"warm\n")  # the thread exists and is named
        before = read_threads(pid)
        say(b"go\n")
        after = read_threads(pid)
    rows = deltas(before, after)
    naps = [row for row in rows if row.name == "naps"]
    assert [(row.threads, row.voluntary >= 50) for row in naps] == [(1, True)]
    assert rows == sorted(rows, key=lambda r: (-r.total, r.name))


@needs_h2load
def test_an_idle_outgoing_stream_adds_a_polling_thread_that_wakes(tmp_path: Path) -> None:
    out = tmp_path / "wakeups.json"
    argv = [sys.executable, "-m", "bench.wakeups", "--target", "nothing", "--target",
            "nothing+stream", "--rounds", "1", "--duration", "0.5", "--idle", "0.1",
            "--json", str(out)]  # fmt: skip
    subprocess.run(argv, cwd=ROOT, check=True, capture_output=True, timeout=120)
    readings = json.loads(out.read_text())
    (plain,), (streaming,) = readings["nothing"], readings["nothing+stream"]
    assert plain["checks"] > 0 and streaming["checks"] > 0
    # grpc's channel spin thread (``_run_channel_spin_thread``'s inner ``_run``), named by what
    # it runs: only the server holding a call has it, and it wakes while checks arrive.
    assert "_run" not in plain["threads"]
    assert streaming["threads"].get("_run", 0) > 0, streaming["threads"]
