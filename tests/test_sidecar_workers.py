"""``spauth sidecar --workers N``: the supervisor starts N workers on one port, each with its own
state directory, forwards SIGTERM, and notices a worker that dies on its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.cpu import descendants
from tests.conftest import RunningControlPlane
from tests.support.ports import free_port
from tests.support.sync import token_file

ROOT = Path(__file__).resolve().parent.parent


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name, or None once the pid is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def _alive(pid: int) -> bool:
    # A zombie has exited: an orphan's reaper (PID 1 of this machine) may never collect it.
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def _workers(supervisor: int) -> list[int]:
    """The supervisor's children (each worker has a control-plane link process of its own)."""
    return [p for p in descendants(supervisor)[1:] if (_stat(p) or ["", ""])[1] == str(supervisor)]


def _all_gone(pids: list[int]) -> bool:
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def supervisor(
    control_plane: RunningControlPlane, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], list[int]]]:
    argv = [
        sys.executable, "-m", "sidecar", "sidecar", "--workers", "2",
        "--listen", f"127.0.0.1:{free_port()}", "--control-plane", control_plane.address,
        "--state-dir", str(tmp_path / "state"), "--metrics-addr", "",
        "--sync-token-file", str(token_file(tmp_path)),
    ]  # fmt: skip
    log = tmp_path / "supervisor.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while len(workers := _workers(proc.pid)) < 2 or not all(
            (tmp_path / "state" / f"worker-{i}").exists() for i in range(2)
        ):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.1)
        yield proc, workers
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for pid in descendants(proc.pid)[1:]:
            os.kill(pid, signal.SIGKILL)


def test_sigterm_to_the_supervisor_stops_every_worker(
    supervisor: tuple[subprocess.Popen[bytes], list[int]],
) -> None:
    proc, workers = supervisor
    below = descendants(proc.pid)[1:]  # the workers and their link processes
    proc.send_signal(signal.SIGTERM)  # to the supervisor only, not its process group
    assert proc.wait(30) == 0
    assert not any(_alive(pid) for pid in workers)
    assert _all_gone(below)


def test_a_worker_dying_stops_the_others_and_fails(
    supervisor: tuple[subprocess.Popen[bytes], list[int]], tmp_path: Path
) -> None:
    proc, workers = supervisor
    below = descendants(proc.pid)[1:]
    os.kill(workers[0], signal.SIGKILL)
    assert proc.wait(30) == 128 + signal.SIGKILL
    assert not any(_alive(pid) for pid in workers)
    # The killed worker's link sees its socket close and exits too.
    assert _all_gone(below)
    assert "exited with -9; stopping the other workers" in (tmp_path / "supervisor.log").read_text()


def test_a_second_sidecar_on_a_taken_port_fails_to_start(
    control_plane: RunningControlPlane, tmp_path: Path
) -> None:
    """Only `--workers` shares a port (SO_REUSEPORT on its children): a stale or second
    sidecar on the same address must fail loudly instead of quietly taking connections."""
    listen = f"127.0.0.1:{free_port()}"

    def sidecar(name: str) -> list[str]:
        return [
            sys.executable, "-m", "sidecar", "sidecar", "--listen", listen,
            "--control-plane", control_plane.address, "--state-dir", str(tmp_path / name),
            "--metrics-addr", "", "--sync-token-file", str(token_file(tmp_path)),
        ]  # fmt: skip

    first = subprocess.Popen(sidecar("a"), cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout is not None
        assert "listening on" in first.stdout.readline()
        second = subprocess.run(
            sidecar("b"), cwd=ROOT, capture_output=True, text=True, timeout=30, check=False
        )
        assert second.returncode == 1
        assert f"cannot listen on {listen}" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.terminate()
        first.communicate(timeout=15)
