"""The `cqil` command line. Each subcommand parses its options here and calls into its stage module.

Errors in the user's input (CqilError) end with one line on stderr and exit status 2; `--debug`
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.model.errors import CqilError

# -- shared options ---------------------------------------------------------------------------------

def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="HF model directory or .gguf file (default: SmolLM2-135M-Instruct)")


def add_plan_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("plan (one of; a merged CQIL checkpoint carries its own)")
    group.add_argument("--plan", type=Path, help="plan.json, or an official CQIL config with cqil_layers")
    group.add_argument("--uniform", metavar="S:E:P", help="groups of P layers in [S, E), as in the paper")
    group.add_argument("--groups", metavar="A-B,...", help="explicit parallel groups, e.g. 15-16,17-18")
    group.add_argument("--bypass", type=int, default=None, metavar="D",
                       help="bypass distance d (default 0; with --plan, the plan's own)")


def add_data_options(parser: argparse.ArgumentParser, batch_size: int = 4) -> None:
    from pipeline.data import DEFAULT_SEQ_LEN

    parser.add_argument("--data", help=".txt, directory of .txt, or .jsonl (default: pydoc_data.topics)")
    parser.add_argument("--eval-data", help="held-out text used whole (default: last 10%% of --data)")
    parser.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="tokens per chunk (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="chunks per batch (default %(default)s)")
    parser.add_argument("--max-chunks", type=int, default=None, help="use at most this many chunks")


def plan_from_args(args: argparse.Namespace, config, required: bool = True):
    """The plan named on the command line, else the one the checkpoint carries, else an error."""
    from pipeline.model import plan as plans

    given = [name for name in ("plan", "uniform", "groups") if getattr(args, name, None)]
    if len(given) > 1:
        raise CqilError(f"give one of --plan, --uniform, --groups (got {', '.join('--' + g for g in given)})")
    record = plans.model_record(config)
    layers = config.num_hidden_layers
    if args.plan:
        plan = plans.load_plan(args.plan, layers)
        if args.bypass is not None:
            plan = plans.Plan(plan.groups, args.bypass, plan.model)
    elif args.uniform:
        plan = plans.parse_uniform_spec(args.uniform, layers, args.bypass or 0, record)
    elif args.groups:
        plan = plans.parse_groups_spec(args.groups, layers, args.bypass or 0, record)
    else:
        plan = plans.plan_from_config(config)
        if plan is None and required:
            raise CqilError("no plan: pass --plan plan.json, --uniform S:E:P or --groups A-B,... "
                            "(or a merged CQIL checkpoint as --model)")
    if plan is not None:
        plan.check_fits(config)
    return plan


def limit_chunks(chunks, max_chunks: int | None):
    return chunks if max_chunks is None else chunks[:max_chunks]


# -- parser ---------------------------------------------------------------------------------------

# Each module registers its subcommands with `register(subparsers)`; heavy imports stay inside the
# command functions so that `cqil --help` is quick and every module imports on a CPU-only machine.
COMMAND_MODULES = (
    "pipeline.commands.core",
    "pipeline.commands.recover",
    "pipeline.commands.export",
    "pipeline.commands.engines",
    "pipeline.commands.triton",
    "pipeline.commands.validate",
    "pipeline.commands.build",
)


def build_parser() -> argparse.ArgumentParser:
    import importlib

    from pipeline import __version__

    parser = argparse.ArgumentParser(prog="cqil", description="CQIL: concurrent quasi-independent layers for LLaMA-family LLMs")
    parser.add_argument("--version", action="version", version=f"cqil-pipeline {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _quiet_libraries() -> None:
    import logging
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=UserWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" notes
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # "Writing model shards" on every save
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        status = args.func(args)  # a command may return a non-zero status (e.g. a failed gate)
    except CqilError as exc:
        if args.debug:
            raise
        print(f"cqil {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cqil {args.command}: interrupted", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
