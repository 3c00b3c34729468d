"""Threads sized to the free cores: which threads of other processes /proc shows running on our cores."""

from __future__ import annotations

import os
from pathlib import Path

from cqil.model.threads import free_cores, running_elsewhere

from tests.helpers import cpu_hogs


def write_stat(proc: Path, pid: int, tid: int, comm: str, state: str, cpu: int) -> None:
    """One /proc/PID/task/TID/stat line as stat(5) lays it out: field 3 the state, field 39 the last CPU."""
    rest = ["0"] * 49
    rest[36] = str(cpu)
    folder = proc / str(pid) / "task" / str(tid)
    folder.mkdir(parents=True)
    (folder / "stat").write_text(f"{tid} ({comm}) {state} " + " ".join(rest[1:]) + "\n")


def test_running_elsewhere_counts_runnable_threads_of_other_processes_on_our_cores(tmp_path):
    own = os.getpid()
    write_stat(tmp_path, own, own, "python", "R", 0)  # this process: never counted
    write_stat(tmp_path, 11, 11, "hog", "R", 1)
    write_stat(tmp_path, 11, 12, "hog worker", "R", 0)  # a second runnable thread of the same process
    write_stat(tmp_path, 12, 12, "a (b) c", "R", 0)  # parentheses and spaces inside the name
    write_stat(tmp_path, 13, 13, "sleeper", "S", 0)
    write_stat(tmp_path, 14, 14, "elsewhere", "R", 5)  # runnable, but on a core we may not use
    assert running_elsewhere({0, 1}, tmp_path) == {(11, 11), (11, 12), (12, 12)}
    assert running_elsewhere({1}, tmp_path) == {(11, 11)}


def test_a_cpu_bound_process_takes_a_core_away():
    cores = len(os.sched_getaffinity(0))
    with cpu_hogs(cores - 1):
        assert free_cores() == 1
