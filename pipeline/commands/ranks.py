"""`--ranks P` for `cqil generate` and `cqil bench`: start P processes with torch's launcher.

The processes run `python -m cqil.pipeline.rank_worker generate|bench ...` (the same entry torchrun users
call), started by torch.distributed's elastic launch API on this host. The model is resolved and
the plan checked against P here first, so a bad input ends with one line before any process starts.
The prompt encoding and the printed text are shared with the one-process generate, so both print
the same thing.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from cqil.engines.bench_settings import RankBenchSettings
from cqil.engines.distributed.launch import check_backend
from cqil.model.errors import ExitCode, Interrupted
from cqil.model.settings import POSITIVE, POSITIVE_NUMBER, one_of, setting
from cqil.model.signals import LAUNCHER_ENV
from cqil.pipeline.commands.options import PLAN_FLAGS
from cqil.pipeline.plan_choice import PlanChoice, config_and_plan
from cqil.pipeline.settings import add_flags, from_args, to_argv

WORKER_MODULE = "cqil.pipeline.rank_worker"


@dataclass(frozen=True)
class RankOptions:
    """How a `--ranks` run is started; the worker gets all but `ranks` (torchrun's --nproc-per-node)."""

    ranks: int | None = setting(None, "run CQIL on P processes, rank r running the r-th layer of each group",
                                check=POSITIVE, metavar="P", toml=False)
    backend: str | None = setting(None, "torch.distributed backend, gloo or nccl (default: nccl where CUDA is "
                                  "present, else gloo)", check=one_of("gloo", "nccl"), toml=False)
    timeout: float | None = setting(None, "seconds a collective may wait before the run fails (default 120)",
                                    check=POSITIVE_NUMBER, metavar="S", toml=False)


def add_rank_options(parser: argparse.ArgumentParser, plan_options: bool = False) -> None:
    """--ranks/--backend/--timeout; `plan_options` adds --uniform/--groups/--bypass where a command lacks them."""
    group = parser.add_argument_group("several processes (torch.distributed)")
    add_flags(group, RankOptions)
    if plan_options:
        add_flags(group, PlanChoice, only=("uniform", "groups", "bypass"))


def checked_model_and_plan(args: argparse.Namespace) -> Path:
    """Resolve --model once (a default-model fetch must not run P times) and check the plan fits P ranks."""
    from cqil.engines.distributed.per_rank import check_world_fits

    PlanChoice.from_args(args).check()
    check_backend(args.backend)
    path, plan = config_and_plan(args)
    check_world_fits(plan, args.ranks)
    return path


def worker_argv(command: str, args: argparse.Namespace, path: Path, settings: Any) -> list[str]:
    """`python -m cqil.pipeline.rank_worker` argv: the command, the model and plan, the rank options and
    `settings`, written from the same fields the worker's parser is made of."""

    return [command, "--model", str(path), *to_argv(PlanChoice.from_args(args), only=PLAN_FLAGS),
            *to_argv(from_args(RankOptions, args), skip=("ranks",)), *to_argv(settings)]


def launch_generate(args: argparse.Namespace, settings) -> int:
    """`cqil generate --ranks P`: the generation on P processes; rank 0 prints the text."""
    from cqil.pipeline.commands.generate import check_context, encode_prompts
    from transformers import AutoConfig, AutoTokenizer

    path = checked_model_and_plan(args)
    ids, _ = encode_prompts(AutoTokenizer.from_pretrained(path), list(settings.prompts), settings.raw)
    check_context(AutoConfig.from_pretrained(path), ids.shape[1], settings.max_new_tokens)  # before any rank starts
    return launch(args.ranks, worker_argv("generate", args, path, settings))


def launch_bench(args: argparse.Namespace, settings, output) -> int:
    """`cqil bench --ranks P`: one process vs tensor parallel vs CQIL on P processes, interleaved;
    `settings` (BenchSettings) with --threads as each rank's threads, `output` where rank 0 writes."""
    shared = {f.name: getattr(settings, f.name) for f in fields(settings) if f.name != "threads"}
    ranked = RankBenchSettings(**shared, threads=settings.threads or 1)
    return launch(args.ranks, [*worker_argv("bench", args, checked_model_and_plan(args), ranked), *to_argv(output)])


def launch(ranks: int, worker_argv: list[str]) -> int:
    """Run `python -m cqil.pipeline.rank_worker ARGV` on `ranks` local processes; the worst exit status.

    A SIGINT or SIGTERM here stops every rank (torch's launcher sends them SIGTERM, which they take at
    once, see model/signals.py) and ends this command with one line and 130 or 143; the ranks die with
    this process even when it is killed with SIGKILL (they set a parent-death signal).
    """
    import logging
    import os

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=ranks, run_id=f"cqil-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.1, start_method="spawn",
                          # Ctrl-C stays cqil's (model/signals.py): it unwinds the launcher, whose shutdown sends
                          # SIGTERM, which stops a rank at any point, even one still starting Python (where a
                          # forwarded SIGINT would print a traceback).
                          signals_to_handle="SIGTERM,SIGHUP,SIGQUIT")
    for name in ["torch.distributed.elastic", *logging.root.manager.loggerDict]:  # the ranks print their own lines
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ[LAUNCHER_ENV] = str(os.getpid())  # the ranks inherit it
    try:
        elastic_launch(config, sys.executable)("-m", WORKER_MODULE, *worker_argv)
    except SignalException as exc:  # the launcher has stopped every rank with the same signal
        raise Interrupted(exc.sigval) from None
    except ChildFailedError as exc:
        codes = {rank: failure.exitcode for rank, failure in exc.failures.items()}
        if ExitCode.BAD_INPUT in codes.values():
            return ExitCode.BAD_INPUT
        silent = {rank: code for rank, code in codes.items() if code not in (ExitCode.RUN_FAILED, ExitCode.BAD_INPUT)}
        if silent:
            print(f"rank(s) {', '.join(map(str, silent))} ended with status {', '.join(map(str, silent.values()))} "
                  "(killed?) without a message", file=sys.stderr)
        return ExitCode.RUN_FAILED
    return ExitCode.OK
