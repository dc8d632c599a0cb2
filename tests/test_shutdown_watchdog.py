"""The stop watchdog (sidecar/ops/shutdown.py): a stop that overruns its budget ends the process
with exit code 70, every thread's stack on stderr and an error log line that says why, instead of
hanging until the orchestrator's SIGKILL. Run in a real child process that blocks forever the way
a stuck thread join would."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from sidecar.ops.shutdown import OVERRUN_EXIT_CODE, SLACK, stop_budget

STUCK = textwrap.dedent(
    """
    import threading
    from sidecar import logs
    from sidecar.ops.shutdown import arm

    logs.configure("info")
    arm(0.3, "sidecar")
    threading.Event().wait()  # a join that never returns
    """
)


def test_a_stop_that_overruns_exits_70_with_the_stacks_and_a_reason() -> None:
    done = subprocess.run(
        [sys.executable, "-c", STUCK], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == OVERRUN_EXIT_CODE
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    overrun = [line for line in lines if line.get("level") == "error"]
    assert overrun and overrun[0]["component"] == "sidecar" and overrun[0]["budget_s"] == 0.3
    assert "shutdown overran" in overrun[0]["msg"]
    assert "Thread 0x" in done.stderr and "wait" in done.stderr  # the stuck main thread


def test_a_stop_in_time_is_not_cut_short() -> None:
    code = "from sidecar.ops.shutdown import arm\narm(30, 'sidecar')\nprint('stopped')"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert (done.returncode, done.stdout.strip()) == (0, "stopped")


def test_the_budget_covers_each_configured_wait() -> None:
    assert stop_budget(3.0, 5.0) == 3.0 + 2 * 5.0 + SLACK
    # The shipped Kubernetes sidecar (preStop 5 s, defaults) is gone before the pod's 30 s.
    assert 5 + stop_budget(0.0, 5.0) <= 30
