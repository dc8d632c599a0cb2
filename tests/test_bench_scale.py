"""bench.scale's memory figures, read from /proc on a real process tree: a "sidecar" that
peaked above what it holds now, and a "link" child started from one of its threads that holds
memory of its own."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from bench.scale import _memory

ROOT = Path(__file__).resolve().parent.parent

# Touches 40 MB and frees it (a peak), then starts a child from a thread (as the sidecar's sync
# thread starts the link) that keeps 20 MB of its own; says "ready" when both are done.
_TREE = textwrap.dedent(
    """
    import subprocess, sys, threading
    peak = bytearray(40 << 20)
    del peak
    child = []
    def start():
        child.append(subprocess.Popen([sys.executable, "-c",
            "import sys; held = bytearray(20 << 20); print('held', flush=True); sys.stdin.read()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE))
    t = threading.Thread(target=start)
    t.start()
    t.join()
    assert child[0].stdout.readline() == b"held\\n"
    print("ready", flush=True)
    sys.stdin.read()
    """
)


def test_memory_reads_the_peak_the_link_and_the_pods_proportional_share() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", _TREE], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
            mem = _memory(proc.pid)
        finally:
            proc.kill()
    assert mem["peak_rss_mb"] >= mem["rss_mb"] + 35
    assert mem["link_rss_mb"] >= 20  # the child's anonymous pages
    assert mem["link_total_rss_mb"] > mem["link_rss_mb"]  # plus the interpreter's file pages
    assert mem["link_peak_rss_mb"] >= mem["link_total_rss_mb"]
    # The two share the interpreter's pages: each one's PSS is below its RSS, and the pod's
    # share is their sum.
    assert mem["pss_mb"] < mem["rss_mb"]
    assert mem["link_pss_mb"] < mem["link_total_rss_mb"]
    # The pod's figure is the sum rounded once; its two parts are each rounded too, so the
    # three can differ by up to 3 x 0.05 MB.
    assert abs(mem["pod_pss_mb"] - (mem["pss_mb"] + mem["link_pss_mb"])) <= 0.15 + 1e-9
