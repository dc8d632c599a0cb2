"""CPU accounting and pinning, straight from /proc and the scheduler.

Server CPU is read from ``/proc/<pid>/stat`` (utime + stime, which already sum every thread of
the process) for the target's process *tree*, so a sidecar that forks workers is counted whole.
Client CPU comes from ``wait4``'s rusage, because h2load has exited by the time we ask.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds; 0.0 if it has gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    # The command name (field 2) may contain spaces and parentheses; fields after the last ')'
    # are fixed: state is field 3, utime field 14, stime field 15.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_SECOND


def system_cpu_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, summed over CPUs.

    Busy minus what the server and h2load used is CPU someone else took during a run: on a
    shared 2-core box that is the first thing to check when numbers move.
    """
    # cpu  user nice system idle iowait irq softirq steal guest guest_nice
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    busy = user + nice + system + irq + softirq
    return busy / _TICKS_PER_SECOND, steal / _TICKS_PER_SECOND


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def tree_cpu_seconds(pids: Iterable[int]) -> float:
    """CPU seconds of the given processes and all their descendants."""
    seen: set[int] = set()
    for pid in pids:
        seen.update(descendants(pid))
    return sum(process_cpu_seconds(p) for p in seen)


def tree_cpu_by_process(pids: Iterable[int]) -> dict[int, float]:
    """CPU seconds of each process in the trees of ``pids`` (to see how workers share load)."""
    seen: set[int] = set()
    for pid in pids:
        seen.update(descendants(pid))
    return {p: process_cpu_seconds(p) for p in sorted(seen)}


def threads(pid: int) -> list[int]:
    """Thread ids of a process."""
    try:
        return [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
    except FileNotFoundError:
        return []


def pin_tree(pids: Iterable[int], cpus: set[int]) -> None:
    """Pin every thread of every process in the trees to ``cpus``.

    Affinity is per thread on Linux; threads created later inherit it from their creator, so
    pinning all existing threads is enough.
    """
    for pid in pids:
        for proc in descendants(pid):
            for tid in threads(proc):
                try:
                    os.sched_setaffinity(tid, cpus)
                except (ProcessLookupError, PermissionError):
                    continue


def default_cpu_split(available: Sequence[int] | None = None) -> tuple[set[int], set[int]]:
    """(server CPUs, client CPUs): last CPU for the server, the rest for the load generator.

    With a single CPU both share it and results say so (machine.cpu_split).
    """
    cpus = sorted(available if available is not None else os.sched_getaffinity(0))
    if len(cpus) < 2:
        return set(cpus), set(cpus)
    return {cpus[-1]}, set(cpus[:-1])


def taskset_prefix(cpus: set[int]) -> list[str]:
    """``taskset -c LIST`` argv prefix: pins a child from its first instruction."""
    return ["taskset", "-c", ",".join(str(c) for c in sorted(cpus))]


def off_server_prefix(server_cpus: frozenset[int] | set[int]) -> list[str]:
    """A taskset prefix keeping a helper process (a control plane feeding the measured sidecar)
    off the server CPUs, so its work is not taken from the server's share; empty when there is
    no other CPU."""
    others = set(range(os.cpu_count() or 1)) - set(server_cpus)
    return taskset_prefix(others) if others else []
