"""Intra-op threads sized to the cores other work leaves free, chosen again before each long step.

OpenMP's passive wait (cqil/__init__.py) stops a waiting thread from burning a core, but a step split
over N threads still waits at every synchronisation point for the slowest one, and a thread that shares
its core with another process runs at half speed. So long loops ask, before each step, how many of this
process's cores other processes are running on now, and use the rest: the step no longer waits for a
thread on a shared core, and the other process keeps its core. On 2 cores with one competitor the step
takes the same time on the free core as on two shared ones (docs/recovery.md, "A busy machine"). A
user's OMP_NUM_THREADS is a choice and is kept.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

PROC = Path("/proc")
SAMPLES = 3  # a process counts as busy only when it is running in every sample: one-off wake-ups do not
SAMPLE_GAP_S = 0.005


def running_elsewhere(cores: set[int], proc: Path = PROC) -> set[tuple[int, int]]:
    """(pid, tid) of every thread of another process that is running or runnable on one of `cores`."""
    own, found = os.getpid(), set()
    for task_stat in proc.glob("[0-9]*/task/[0-9]*/stat"):
        pid = int(task_stat.parent.parent.parent.name)
        if pid == own:
            continue
        try:
            fields = task_stat.read_text().rpartition(")")[2].split()
        except OSError:  # the thread ended while we looked
            continue
        state, last_cpu = fields[0], int(fields[36])  # stat(5): field 3 is the state, field 39 the last CPU
        if state == "R" and last_cpu in cores:
            found.add((pid, int(task_stat.parent.name)))
    return found


def free_cores(proc: Path = PROC) -> int | None:
    """This process's cores less those that other processes' threads keep busy now; None off Linux."""
    cores = os.sched_getaffinity(0)
    if not (proc / "self" / "task").is_dir():
        return None
    busy = running_elsewhere(cores, proc)
    for _ in range(SAMPLES - 1):
        time.sleep(SAMPLE_GAP_S)
        busy &= running_elsewhere(cores, proc)
    return max(1, len(cores) - len(busy))


class FreeCoreThreads:
    """Call before each step of a long loop: sets PyTorch's intra-op threads to the free cores.

    Never above the thread count PyTorch started with, and a no-op when the user chose OMP_NUM_THREADS.
    Used as a context manager around the loop, it gives PyTorch its starting thread count back at the end.
    """

    def __init__(self) -> None:
        self.most = torch.get_num_threads()
        self.enabled = "OMP_NUM_THREADS" not in os.environ

    def __call__(self) -> int:
        if self.enabled:
            free = free_cores()
            threads = self.most if free is None else min(self.most, free)
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
        return torch.get_num_threads()

    def __enter__(self) -> FreeCoreThreads:
        return self

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.most)
