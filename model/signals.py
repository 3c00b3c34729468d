"""Ctrl-C and SIGTERM: every `cqil` process stops, cleans up and exits 130 or 143, and no interrupt is lost.

`install()` (pipeline/cli.py, the ranks' worker) makes SIGINT and SIGTERM raise `Interrupted`, a
KeyboardInterrupt, so `finally` blocks and fsutil's atomic writes clean up on both. Python drops an
exception raised inside a finalizer (`__del__`, a weakref callback, a generator closed by the garbage
collector) with "Exception ignored in ...": a signal that lands there was lost and the command ran on
(seen in the recover stage, where tqdm bars and torch objects are finalized all the time). The
unraisable hook below catches exactly that case and raises the signal again in the main thread once
the finalizer has returned.

The ranks of `--ranks P` are started by cqil's launcher (engines/distributed, pipeline/commands/ranks.py),
which forwards a signal to them and reports it in one line: a launched rank takes the signal's default
action (it stops at once, even inside a collective), and dies with its launcher (`die_with_parent`), so
`kill -9` of the launcher leaves no rank running.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from typing import Any

from cqil.model.errors import Interrupted

HANDLED = (signal.SIGINT, signal.SIGTERM)
LAUNCHER_ENV = "CQIL_LAUNCHER_PID"  # set by cqil's launcher for the ranks it starts
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _raise(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


def _redeliver(unraisable: Any) -> None:
    """An interrupt raised inside a finalizer: raise it again in the main thread, after the finalizer."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        import _thread

        # Not from here (the handler would run inside this hook and be dropped again) and without waiting
        # for the thread to start (a wait runs pending handlers): a bare thread, once this hook returned.
        _thread.start_new_thread(_interrupt_main_soon, (getattr(unraisable.exc_value, "signum", signal.SIGINT),))
        return
    _previous_hook(unraisable)


def _interrupt_main_soon(signum: int) -> None:
    import _thread
    import time

    time.sleep(0.01)
    _thread.interrupt_main(signum)


_previous_hook = sys.unraisablehook


def install() -> None:
    """SIGINT and SIGTERM raise Interrupted, never lost in a finalizer (main thread only; else a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in HANDLED:
        signal.signal(signum, _raise)
    if sys.unraisablehook is not _redeliver:
        global _previous_hook
        _previous_hook = sys.unraisablehook
        sys.unraisablehook = _redeliver


def exit_code(exc: KeyboardInterrupt) -> int:
    """130 for Ctrl-C, 143 for SIGTERM."""
    return getattr(exc, "exit_code", 128 + signal.SIGINT)


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux to kill this process when its parent dies (PR_SET_PDEATHSIG), or leave now if it has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the launcher's own shutdown is all there is
        return
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(128 + signal.SIGKILL)


def as_launched_rank() -> bool:
    """In a rank started by cqil's launcher: die with it, and take SIGINT/SIGTERM's default action (the
    launcher says what happened, in one line). False when started otherwise (e.g. by torchrun)."""
    parent = os.environ.get(LAUNCHER_ENV)
    if not parent:
        return False
    die_with_parent(int(parent))
    for signum in HANDLED:
        signal.signal(signum, signal.SIG_DFL)
    return True
