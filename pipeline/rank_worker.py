"""What each rank runs: `torchrun --nproc-per-node P -m cqil.pipeline.rank_worker generate|bench ...`.

`cqil generate --ranks P` and `cqil bench --ranks P` start these same commands (pipeline/commands/ranks.py).
Options are those of the one-process commands; rank 0 prints and writes, every rank ends with one
line on failure (engines/distributed/launch.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

PROGRAM = "cqil-ranks"


def build_parser() -> argparse.ArgumentParser:
    from cqil.pipeline.commands.options import add_model_options, add_plan_options

    parser = argparse.ArgumentParser(prog="torchrun --nproc-per-node P -m cqil.pipeline.rank_worker",
                                     description="CQIL with rank r running the r-th layer of every group")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("generate", "greedy generation with the KV cache (rank 0 prints the text)"),
                       ("bench", "one process vs tensor parallel vs CQIL, interleaved (rank 0 writes the JSON)")):
        p = sub.add_parser(name, help=text)
        add_model_options(p)
        add_plan_options(p)
        p.add_argument("--backend", choices=("gloo", "nccl"), default=None,
                       help="default: nccl where CUDA is present, else gloo")
        p.add_argument("--timeout", type=float, default=None, help="collective timeout in seconds (default 120)")
        if name == "generate":
            p.add_argument("--prompt", action="append", required=True, help="prompt (repeat for a batch)")
            p.add_argument("--max-new-tokens", type=int, default=64)
            p.add_argument("--raw", action="store_true", help="do not apply the tokenizer's chat template")
            p.add_argument("--memory", action="store_true", help="each rank reports its parameters and resident memory")
        else:
            for option, default in (("batch", 1), ("seq", 128), ("past", 128), ("prefill-repeats", 10),
                                    ("decode-repeats", 50), ("warmup", 3), ("rank-threads", 1)):
                p.add_argument(f"--{option}", type=int, default=default, help="default %(default)s")
            p.add_argument("--one-process-threads", type=int, default=None,
                           help="threads of the one-process row (default: ranks x rank threads)")
            p.add_argument("--out", type=Path, help="write the cqil-bench/1 JSON here (chart beside it)")
            p.add_argument("--chart", type=Path, help="PNG chart path (default: --out with .png)")
            p.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    from cqil.engines.distributed.launch import DEFAULT_TIMEOUT_S, run_ranks
    from cqil.model import signals
    from cqil.pipeline.cli import quiet_libraries

    if not signals.as_launched_rank():  # started by torchrun: Ctrl-C and SIGTERM are this rank's to report
        signals.install()
    args = build_parser().parse_args(argv)
    quiet_libraries()
    body = {"generate": _generate, "bench": _bench}[args.command]
    return run_ranks(f"{PROGRAM} {args.command}", args.backend, lambda ctx: body(args, ctx),
                     args.timeout or DEFAULT_TIMEOUT_S)


def _rank_model(args: argparse.Namespace, ctx):
    """This rank's CQIL share, loaded with only its own weights, and the tokenizer."""
    import torch
    from cqil.engines.distributed.per_rank import Placement, load_rank_model, rank_model
    from cqil.pipeline.plan_choice import PlanChoice, resolve_plan
    from cqil.pipeline.sources import check_model_dir, resolve_model_dir
    from transformers import AutoConfig, AutoTokenizer

    path = resolve_model_dir(args.model)
    check_model_dir(path)
    plan = resolve_plan(PlanChoice.from_args(args), AutoConfig.from_pretrained(path))
    placement = Placement(plan, ctx.rank, ctx.world)
    model = rank_model(load_rank_model(path, placement, torch.float32).to(ctx.device), placement)
    return model, AutoTokenizer.from_pretrained(path), path


def _generate(args: argparse.Namespace, ctx) -> int:
    import torch
    from cqil.engines.distributed.launch import together
    from cqil.engines.distributed.per_rank import AgreedTokens
    from cqil.model.cqil import greedy_generate
    from cqil.pipeline.commands.generate import encode_prompts, format_generations

    if "OMP_NUM_THREADS" not in os.environ and ctx.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.world))
    model, tokenizer, _ = together(ctx, lambda: _rank_model(args, ctx))
    ids, mask = encode_prompts(tokenizer, args.prompt, args.raw)
    new = greedy_generate(AgreedTokens(model, ctx.device), ids, mask, args.max_new_tokens, tokenizer.eos_token_id)
    if ctx.rank == 0:
        print(format_generations(tokenizer, args.prompt, new), flush=True)
    if args.memory:
        _report_memory(ctx, model)
    return 0


def _report_memory(ctx, model) -> None:
    """One stderr line per rank, in rank order: parameters held and resident memory (now and peak)."""
    import resource

    import torch.distributed as dist
    from cqil.engines.distributed.per_rank import parameter_count

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
    import torch
    from cqil.engines.distributed.bench import (
        RankBenchSettings,
        plot_rank_bench,
        run_rank_bench,
    )
    from cqil.engines.distributed.launch import together
    from cqil.engines.distributed.tensor_parallel import apply_tensor_parallel
    from cqil.model.fsutil import atomic_write_text
    from transformers import AutoModelForCausalLM

    settings = RankBenchSettings(batch=args.batch, seq=args.seq, past=args.past,
                                 prefill_repeats=args.prefill_repeats, decode_repeats=args.decode_repeats,
                                 warmup=args.warmup, rank_threads=args.rank_threads,
                                 one_process_threads=args.one_process_threads or ctx.world * args.rank_threads)

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
    chart = args.chart or (args.out.with_suffix(".png") if args.out else None)
    if chart is not None:
        result["chart"] = str(plot_rank_bench(result, chart))
    if args.out is not None:
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['plan']} on {ctx.world} ranks ({ctx.backend}); threads: one process "
          f"{result['threads']['one_process']}, each rank {settings.rank_threads}")
    for name, scenario in result["scenarios"].items():
        print(f"{name} {scenario['shape']}:")
        for row, stats in scenario["rows"].items():
            vs = (f"  x{stats['ratio_to_one_process']:.3f} of one process" if "ratio_to_one_process" in stats else "")
            print(f"  {row:<16} p50 {stats['p50_ms']:9.3f} ms  p90 {stats['p90_ms']:9.3f}{vs}")
        low, high = scenario["ratio_ci"]
        print(f"  CQIL / tensor parallel {scenario['ratio']:.3f} [{low:.3f}, {high:.3f}], "
              f"ideal depth ratio {result['ideal_depth_ratio']:.3f}")
    if chart is not None:
        print(f"chart: {chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
