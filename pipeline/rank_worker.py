"""What each rank runs: `torchrun --nproc-per-node P -m cqil.pipeline.rank_worker generate|bench|cost-model ...`.

`cqil generate --ranks P`, `cqil bench --ranks P` and `cqil bench --cost-model COST.json --ranks P` start these
same commands (pipeline/commands/ranks.py, pipeline/commands/bench.py).
Options are those of the one-process commands; rank 0 prints and writes, every rank ends with one
line on failure (engines/distributed/launch.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys

import torch
import torch.distributed as dist
from cqil.engines.bench_report import plot_bench, report_lines
from cqil.engines.bench_settings import RankBenchSettings
from cqil.engines.cost_model import measure_rank_cost_model, rank_cost_calls, save_cost_model
from cqil.engines.distributed.bench import run_rank_bench
from cqil.engines.distributed.launch import DEFAULT_TIMEOUT_S, run_ranks, together
from cqil.engines.distributed.per_rank import AgreedTokens, Placement, load_rank_model, parameter_count, rank_model
from cqil.engines.distributed.tensor_parallel import apply_tensor_parallel
from cqil.model import signals
from cqil.model.errors import ExitCode
from cqil.model.fsutil import atomic_write_text
from cqil.model.steps import greedy_generate
from cqil.pipeline.cli import OptionError, Parser, quiet_libraries
from cqil.pipeline.commands.bench import BenchOutput, RankCostSettings, cost_model_lines
from cqil.pipeline.commands.generate import GenerateSettings, encode_prompts, format_generations
from cqil.pipeline.commands.options import add_model_options, add_plan_options
from cqil.pipeline.commands.ranks import RankOptions
from cqil.pipeline.plan_choice import config_and_plan
from cqil.pipeline.settings import add_flags, from_args
from cqil.pipeline.sources import resolve_model_dir
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

PROGRAM = "cqil-ranks"


def build_parser() -> argparse.ArgumentParser:
    """The worker's options: those of `cqil generate` / `cqil bench`, made from the same settings classes."""
    parser = Parser(prog="torchrun --nproc-per-node P -m cqil.pipeline.rank_worker",
                    description="CQIL with rank r running the r-th layer of every group")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text, settings in (
            ("generate", "greedy generation with the KV cache (rank 0 prints the text)", (GenerateSettings,)),
            ("bench", "one process vs tensor parallel vs CQIL, interleaved (rank 0 writes the JSON)",
             (RankBenchSettings, BenchOutput))):
        p = sub.add_parser(name, help=text)
        add_model_options(p)
        add_plan_options(p)
        add_flags(p, RankOptions, skip=("ranks",))
        for cls in settings:
            add_flags(p, cls)
        if name == "generate":
            p.add_argument("--memory", action="store_true", help="each rank reports its parameters and resident memory")
    p = sub.add_parser("cost-model", help="the decode cost per layer and per group size on these ranks (rank 0 "
                       "writes the cost model)")
    add_model_options(p)
    add_flags(p, RankOptions, skip=("ranks",))
    add_flags(p, RankCostSettings)
    return parser


def main(argv: list[str] | None = None) -> int:
    if not signals.as_launched_rank():  # started by torchrun: Ctrl-C and SIGTERM are this rank's to report
        signals.install()
    try:
        args = build_parser().parse_args(argv)
    except OptionError as exc:
        print(f"{exc.prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    quiet_libraries()
    body = {"generate": _generate, "bench": _bench, "cost-model": _cost_model}[args.command]
    return run_ranks(f"{PROGRAM} {args.command}", args.backend, lambda ctx: body(args, ctx),
                     args.timeout or DEFAULT_TIMEOUT_S)


def _rank_model(args: argparse.Namespace, ctx):
    """This rank's CQIL share, loaded with only its own weights, and the tokenizer."""
    path, plan = config_and_plan(args)
    placement = Placement(plan, ctx.rank, ctx.world)
    model = rank_model(load_rank_model(path, placement, torch.float32).to(ctx.device), placement)
    return model, AutoTokenizer.from_pretrained(path), path


def _generate(args: argparse.Namespace, ctx) -> int:
    if "OMP_NUM_THREADS" not in os.environ and ctx.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.world))
    settings = from_args(GenerateSettings, args)
    model, tokenizer, _ = together(ctx, lambda: _rank_model(args, ctx))
    ids, mask = encode_prompts(tokenizer, list(settings.prompts), settings.raw)
    new = greedy_generate(AgreedTokens(model, ctx.device), ids, mask, settings.max_new_tokens, tokenizer.eos_token_id)
    if ctx.rank == 0:
        print(format_generations(tokenizer, list(settings.prompts), new), flush=True)
    if args.memory:
        _report_memory(ctx, model)
    return 0


def _report_memory(ctx, model) -> None:
    """One stderr line per rank, in rank order: parameters held and resident memory (now and peak)."""
    params = parameter_count(model)
    size = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open("/proc/self/statm") as statm:
        resident = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    for rank in range(ctx.world):
        if rank == ctx.rank:
            print(f"rank {rank}: layers {model.schedule.placement.layers}, {params} parameters ({size / 2**20:.1f} MiB), "
                  f"resident {resident:.0f} MiB (peak {peak:.0f} MiB)", file=sys.stderr, flush=True)
        dist.barrier()


def _bench(args: argparse.Namespace, ctx) -> int:
    parsed = from_args(RankBenchSettings, args)
    settings = from_args(RankBenchSettings, args,
                         one_process_threads=parsed.one_process_threads or ctx.world * parsed.threads)
    output = from_args(BenchOutput, args)

    def load():
        cqil, _, path = _rank_model(args, ctx)
        full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        one = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval() if ctx.rank == 0 else None
        return {"one_process": one.to(ctx.device) if one is not None else None,
                "tensor_parallel": apply_tensor_parallel(full, ctx.rank, ctx.world).to(ctx.device), "cqil": cqil}

    models = together(ctx, load)
    result = run_rank_bench(ctx, models, settings)
    if result is None:
        return 0
    chart = output.chart_path()
    if chart is not None:
        result["chart"] = str(plot_bench(result, chart))
    if output.out is not None:
        atomic_write_text(output.out, json.dumps(result, indent=2) + "\n")
    if output.json:
        print(json.dumps(result, indent=2))
        return 0
    print("\n".join(report_lines(result, f"{result['plan']} on {ctx.world} ranks ({ctx.backend}); threads: one "
                                          f"process {result['threads']['one_process']}, each rank {settings.threads}")))
    return 0


def _cost_model(args: argparse.Namespace, ctx) -> int:
    settings = from_args(RankCostSettings, args)
    path = resolve_model_dir(args.model)
    torch.set_num_threads(settings.threads)
    calls = together(ctx, lambda: rank_cost_calls(ctx, path, settings.cost_settings()))
    model = measure_rank_cost_model(ctx, calls, settings.cost_settings())
    if model is None:
        return 0
    save_cost_model(model, settings.cost_model)
    print("\n".join(cost_model_lines(settings.cost_model, path.name, model,
                                      AutoConfig.from_pretrained(path).num_hidden_layers)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
