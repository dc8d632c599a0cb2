"""A child Python process driven a line at a time: the child acts on each line it reads and
echoes it back, so a test can read /proc between two known points of the child's work
(tests/test_bench_wakeups.py, tests/test_bench_tail.py)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


@contextlib.contextmanager
def lockstep_child(code: str) -> Iterator[tuple[int, Callable[[bytes], None]]]:
    """Run ``code`` in a new interpreter (from the repository's root); yields its pid and
    ``say``, which sends one line and waits until the child has echoed it. Killed on exit."""
    with subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as proc:
        stdin, stdout = proc.stdin, proc.stdout
        assert stdin is not None and stdout is not None

        def say(line: bytes) -> None:
            stdin.write(line)
            stdin.flush()
            assert stdout.readline() == line

        try:
            yield proc.pid, say
        finally:
            proc.kill()
