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
from pathlib import Path

from cqil.model.errors import ExitCode

WORKER_MODULE = "cqil.pipeline.rank_worker"


def add_rank_options(parser: argparse.ArgumentParser, plan_options: bool = False) -> None:
    """--ranks/--backend/--timeout; `plan_options` adds --uniform/--groups/--bypass where a command lacks them."""
    from cqil.pipeline.commands.options import NON_NEGATIVE, POSITIVE, POSITIVE_NUMBER, TEXT

    group = parser.add_argument_group("several processes (torch.distributed)")
    group.add_argument("--ranks", type=POSITIVE, default=None, metavar="P",
                       help="run CQIL on P processes, rank r running the r-th layer of each group")
    group.add_argument("--backend", choices=("gloo", "nccl"), default=None,
                       help="torch.distributed backend (default: nccl where CUDA is present, else gloo)")
    group.add_argument("--timeout", type=POSITIVE_NUMBER, default=None, metavar="S",
                       help="seconds a collective may wait before the run fails (default 120)")
    if plan_options:
        group.add_argument("--uniform", type=TEXT, metavar="S:E:P", help="with --ranks: groups of P layers in [S, E)")
        group.add_argument("--groups", type=TEXT, metavar="A-B,...", help="with --ranks: explicit parallel groups")
        group.add_argument("--bypass", type=NON_NEGATIVE, default=None, metavar="D",
                           help="with --ranks: bypass distance d")


def checked_model_and_plan(args: argparse.Namespace):
    """Resolve --model once (a default-model fetch must not run P times) and check the plan fits P ranks."""
    from cqil.engines.distributed.launch import check_backend
    from cqil.engines.distributed.per_rank import check_world_fits
    from cqil.pipeline.plan_choice import PlanChoice, resolve_plan
    from cqil.pipeline.sources import check_model_dir, resolve_model_dir
    from transformers import AutoConfig

    choice = PlanChoice.from_args(args)
    choice.check()
    check_backend(args.backend)
    path = resolve_model_dir(args.model)
    check_model_dir(path)
    plan = resolve_plan(choice, AutoConfig.from_pretrained(path))
    check_world_fits(plan, args.ranks)
    return path


def _plan_argv(args: argparse.Namespace) -> list[str]:
    argv = []
    for name in ("plan", "uniform", "groups", "bypass"):
        value = getattr(args, name, None)
        if value is not None:
            argv += [f"--{name}", str(value)]
    return argv


def _common_argv(args: argparse.Namespace, path: Path) -> list[str]:
    argv = ["--model", str(path), *_plan_argv(args)]
    if args.backend:
        argv += ["--backend", args.backend]
    if args.timeout is not None:
        argv += ["--timeout", str(args.timeout)]
    return argv


def launch_generate(args: argparse.Namespace) -> int:
    """`cqil generate --ranks P`: the generation on P processes; rank 0 prints the text."""
    from cqil.pipeline.commands.generate import check_context, encode_prompts
    from transformers import AutoConfig, AutoTokenizer

    path = checked_model_and_plan(args)
    ids, _ = encode_prompts(AutoTokenizer.from_pretrained(path), args.prompt, args.raw)
    check_context(AutoConfig.from_pretrained(path), ids.shape[1], args.max_new_tokens)  # before any rank starts
    argv = ["generate", *_common_argv(args, path),
            "--max-new-tokens", str(args.max_new_tokens)]
    for prompt in args.prompt:
        argv += ["--prompt", prompt]
    if args.raw:
        argv.append("--raw")
    return launch(args.ranks, argv)


def launch_bench(args: argparse.Namespace) -> int:
    """`cqil bench --ranks P`: one process vs tensor parallel vs CQIL on P processes, interleaved."""
    argv = ["bench", *_common_argv(args, checked_model_and_plan(args))]
    for name in ("batch", "seq", "past", "prefill_repeats", "decode_repeats", "warmup"):
        argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.threads is not None:
        argv += ["--rank-threads", str(args.threads)]
    for name in ("out", "chart"):
        if getattr(args, name) is not None:
            argv += [f"--{name}", str(getattr(args, name))]
    if args.json:
        argv.append("--json")
    return launch(args.ranks, argv)


def launch(ranks: int, worker_argv: list[str]) -> int:
    """Run `python -m cqil.pipeline.rank_worker ARGV` on `ranks` local processes; the worst exit status.

    A SIGINT or SIGTERM here stops every rank (torch's launcher sends them SIGTERM, which they take at
    once, see model/signals.py) and ends this command with one line and 130 or 143; the ranks die with
    this process even when it is killed with SIGKILL (they set a parent-death signal).
    """
    import logging
    import os

    from cqil.model.errors import Interrupted
    from cqil.model.signals import LAUNCHER_ENV
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
