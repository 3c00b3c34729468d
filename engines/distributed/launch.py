"""Process-group setup for ranks started by torchrun (or `cqil ... --ranks P`), and how they fail.

Every rank must end with one line and the same kind of exit status, never hang: the process group
gets a collective timeout, a bad input found before the group exists ends every rank alike (each
rank checks the same input), and a failure while loading is agreed on with one all-reduce of the
ranks' status codes, so the ranks that loaded fine stop with a line that names the failed rank.
Exit status (cqil.model.errors.ExitCode): 2 for bad input (CqilError), 4 for a run that broke (a lost peer,
a timeout, a crash), so that CI never mistakes a broken run for a check that failed (1).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from cqil.model.errors import CqilError, ExitCode

BACKENDS = ("gloo", "nccl")
DEFAULT_TIMEOUT_S = 120.0
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
T = TypeVar("T")


@dataclass(frozen=True)
class RankContext:
    rank: int
    world: int
    local_rank: int
    backend: str

    @property
    def device(self) -> Any:
        import torch

        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")


class RankAbort(Exception):
    """This rank stops with `status` after printing `message` (another rank failed, or it did)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def default_backend() -> str:
    """NCCL where CUDA is present, else gloo."""
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def check_backend(name: str | None) -> str:
    """The backend to use, or a CqilError saying why the named one cannot run here."""
    import torch
    import torch.distributed as dist

    name = name or default_backend()
    if name not in BACKENDS:
        raise CqilError(f"--backend '{name}' is not one of {', '.join(BACKENDS)}")
    if not dist.is_available():
        raise CqilError("this torch build has no torch.distributed: install a torch wheel with distributed support")
    if name == "nccl":
        if not torch.cuda.is_available():
            raise CqilError("--backend nccl needs CUDA GPUs and there are none here: use --backend gloo")
        if not dist.is_nccl_available():
            raise CqilError("this torch build has no NCCL: install a CUDA torch wheel, or use --backend gloo")
    if name == "gloo" and not dist.is_gloo_available():
        raise CqilError("this torch build has no gloo backend: use --backend nccl on GPUs")
    return name


def init_process_group(backend: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> RankContext:
    """Join the group torchrun described in the environment; collectives time out after `timeout_s`."""
    import torch
    import torch.distributed as dist

    missing = [name for name in TORCHRUN_ENV if name not in os.environ]
    if missing:
        raise CqilError(f"not started by torchrun ({', '.join(missing)} unset): run "
                        "`torchrun --nproc-per-node P -m cqil.pipeline.rank_worker ...` or `cqil generate --ranks P`")
    ctx = RankContext(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                      int(os.environ.get("LOCAL_RANK", os.environ["RANK"])), backend)
    if backend == "nccl":
        if ctx.local_rank >= torch.cuda.device_count():
            raise CqilError(f"local rank {ctx.local_rank} has no GPU ({torch.cuda.device_count()} visible): "
                            "start at most one rank per GPU")
        torch.cuda.set_device(ctx.local_rank)
    dist.init_process_group(backend, rank=ctx.rank, world_size=ctx.world, timeout=timedelta(seconds=timeout_s))
    return ctx


def together(ctx: RankContext, load: Callable[[], T]) -> T:
    """Run `load` on every rank and agree on the outcome: all ranks return, or all raise RankAbort."""
    import torch
    import torch.distributed as dist

    status, error, value = 0, "", None
    try:
        value = load()
    except CqilError as exc:
        status, error = ExitCode.BAD_INPUT, str(exc)
    except Exception as exc:  # noqa: BLE001 - any load failure must reach the other ranks
        status, error = ExitCode.RUN_FAILED, f"failed to load: {one_line(exc)}"
    flags = torch.zeros(ctx.world, dtype=torch.long, device=ctx.device)
    flags[ctx.rank] = status
    dist.all_reduce(flags)  # every rank learns which ranks failed, and how
    if status:
        raise RankAbort(status, error)
    failed = [r for r in range(ctx.world) if flags[r]]
    if failed:
        raise RankAbort(int(flags.max()), f"stopping: rank {failed[0]} failed to load (its own line says why)")
    return value


def one_line(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    first = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", text[0]) if text else ""  # gloo's source location
    return f"{type(exc).__name__}: {first}".rstrip(": ")


def run_ranks(program: str, backend: str | None, body: Callable[[RankContext], int | None],
              timeout_s: float = DEFAULT_TIMEOUT_S) -> int:
    """Set up the group, run `body` on this rank, and turn every way of failing into one line + status."""
    import torch.distributed as dist

    rank = os.environ.get("RANK", "?")
    status = 0
    try:
        ctx = init_process_group(check_backend(backend), timeout_s)
        status = body(ctx) or 0
    except CqilError as exc:
        print(f"{program} [rank {rank}]: error: {exc}", file=sys.stderr)
        status = ExitCode.BAD_INPUT
    except RankAbort as exc:
        print(f"{program} [rank {rank}]: error: {exc}", file=sys.stderr)
        status = exc.status
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM under torchrun (cqil's launcher stops its ranks itself)
        from cqil.model.signals import exit_code

        print(f"{program} [rank {rank}]: interrupted", file=sys.stderr)
        status = exit_code(exc)
    except Exception as exc:  # noqa: BLE001 - a lost peer, a timeout: one line, not a traceback per rank
        print(f"{program} [rank {rank}]: error: the run failed ({one_line(exc)})", file=sys.stderr)
        status = ExitCode.RUN_FAILED
    finally:
        if dist.is_available() and dist.is_initialized():
            if status == 0:
                try:
                    dist.barrier()  # no rank tears the group down while a peer still uses it
                    dist.destroy_process_group()
                except Exception as exc:  # noqa: BLE001 - a peer that failed after this rank finished
                    print(f"{program} [rank {rank}]: error: the run failed ({one_line(exc)})", file=sys.stderr)
                    status = ExitCode.RUN_FAILED
            # Leave without the interpreter's teardown: after a failure a dead peer can make it wait for the
            # timeout again, and after success gloo's threads can abort the process as Python unwinds
            # ("terminate called without an active exception", seen about once in seven runs).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    return status
