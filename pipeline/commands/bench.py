"""`cqil bench`: latency of the original vs the CQIL model on ONNX Runtime, interleaved."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cqil.pipeline.commands.onnx_source import load_source, onnx_and_plan, write_json
from cqil.pipeline.commands.options import (
    INPUT_PATH,
    JSON_FILE,
    NON_NEGATIVE,
    OUTPUT_FILE,
    POSITIVE,
    TEXT,
    add_model_options,
    at_least,
)
from cqil.pipeline.commands.ranks import add_rank_options


def cmd_bench(args: argparse.Namespace) -> int | None:
    if args.cost_model is not None:
        return _cost_model(args)
    if args.ranks is not None:  # --ranks P: one process vs TP vs CQIL on P processes (pipeline/commands/ranks.py)
        from cqil.pipeline.commands.ranks import launch_bench

        return launch_bench(args)
    if args.onnx is None:
        from cqil.model.errors import CqilError

        raise CqilError("--onnx is required (or --ranks P for the multi-process bench of the PyTorch model)")
    from cqil.engines.bench import BenchSettings, run_bench
    from cqil.engines.bench_chart import plot_bench
    from cqil.model.cqil import CqilModel
    from cqil.model.fsutil import check_output_file
    from cqil.model.plan import identity_plan
    from cqil.pipeline.reference import cached_reference

    settings = BenchSettings(batch=args.batch, seq=args.seq, past=args.past, prefill_repeats=args.prefill_repeats,
                             decode_repeats=args.decode_repeats, warmup=args.warmup, threads=args.threads)
    chart = args.chart or (args.out.with_suffix(".png") if args.out else None)
    if chart is not None:
        check_output_file(chart, "--chart")
    onnx_path, spec, plan = onnx_and_plan(args)
    reference = args.reference or cached_reference(spec, onnx_path, args.model)
    torch_models = None
    if not args.no_torch:
        loaded = load_source(args, spec, onnx_path, plan)
        torch_models = {"reference": CqilModel(loaded.model, identity_plan(plan.num_layers)),
                        "candidate": CqilModel(loaded.model, plan)}
    result = run_bench(onnx_path, reference, settings, torch_models)
    if chart is not None:
        plot_bench(result, chart)
        result["chart"] = str(chart)
    write_json(args.out, result)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{onnx_path} ({result['candidate']['plan']}) vs {result['reference']['onnx']}, "
          f"{', '.join(result['providers'])}, threads {settings.threads or 'default'}")
    for name, scenario in result["scenarios"].items():
        rows = {"ORT reference": scenario["reference"], "ORT candidate": scenario["candidate"],
                **{key.replace("pytorch_", "PyTorch "): value for key, value in scenario.get("rows", {}).items()}}
        print(f"{name} {scenario['shape']}:")
        for label, stats in rows.items():
            print(f"  {label:<18} p50 {stats['p50_ms']:9.3f} ms  p90 {stats['p90_ms']:9.3f}  p99 {stats['p99_ms']:9.3f}")
        low, high = scenario["ratio_ci"]
        print(f"  ratio candidate/reference {scenario['ratio']:.3f} [{low:.3f}, {high:.3f}], "
              f"ideal depth ratio {result['ideal_depth_ratio']:.3f}")
    if chart is not None:
        print(f"chart: {chart}")


def _cost_model(args: argparse.Namespace) -> None:
    """`--cost-model COST.json`: per-layer and per-group decode cost on ONNX Runtime (engines/cost_model.py)."""
    import tempfile

    from cqil.engines.cost_model import CostSettings, measure_cost_model, save_cost_model
    from cqil.model.cqil import CqilModel
    from cqil.model.errors import CqilError
    from cqil.model.plan import identity_plan, model_record
    from cqil.pipeline.sources import load_model

    if args.ranks is not None or args.onnx is not None:
        raise CqilError("--cost-model measures the ONNX Runtime CPU costs of --model: drop --ranks / --onnx")
    layouts = tuple(dict.fromkeys(part.strip() for part in args.cost_layouts.split(",") if part.strip()))
    if not layouts or set(layouts) - {"branches", "fused"}:
        raise CqilError(f"--cost-layouts '{args.cost_layouts}' must list branches and/or fused")
    settings = CostSettings(past=args.past, repeats=args.decode_repeats, warmup=args.warmup,
                            max_group_size=args.cost_max_group_size, layouts=layouts, threads=args.threads)
    loaded = load_model(args.model)
    config = loaded.model.config
    original = CqilModel(loaded.model, identity_plan(config.num_hidden_layers, model_record(config)))
    threads = f"{args.threads} threads" if args.threads else "default threads"
    with tempfile.TemporaryDirectory(prefix="cqil-cost-") as workdir:
        model = measure_cost_model(original, f"onnxruntime-cpu ({threads})", settings, Path(workdir))
    save_cost_model(model, args.cost_model)
    original_step = model.original(config.num_hidden_layers)
    print(f"{args.cost_model}: {loaded.name} on {model.target}, decode step over {args.past} past tokens: "
          f"base {model.base * 1e3:.3f} ms, layer {model.layer * 1e3:.3f} ms, original {original_step * 1e3:.2f} ms")
    for layout, sizes in model.groups.items():
        row = ", ".join(f"p={p}: {s * 1e3:.3f} ms (saves {(p * model.layer - s) / original_step:.1%})"
                        for p, s in sorted(sizes.items()))
        print(f"  {layout}: {row}")


def register(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="latency of the original vs the CQIL model on ONNX Runtime, interleaved")
    b.add_argument("--onnx", type=INPUT_PATH, help="the candidate (CQIL) folder written by cqil export (required without --ranks)")
    b.add_argument("--reference", type=INPUT_PATH,
                   help="the original model's ONNX folder (default: exported once into the CQIL cache)")
    add_model_options(b)
    b.add_argument("--plan", type=JSON_FILE, help="plan.json; must match the plan stored in the ONNX")
    b.add_argument("--batch", type=POSITIVE, default=1, help="rows per call (default %(default)s)")
    b.add_argument("--seq", type=POSITIVE, default=128, help="prefill tokens (default %(default)s)")
    b.add_argument("--past", type=POSITIVE, default=128, help="decode context length (default %(default)s)")
    b.add_argument("--prefill-repeats", type=POSITIVE, default=20, help="timed prefill rounds (default %(default)s)")
    b.add_argument("--decode-repeats", type=POSITIVE, default=100, help="timed decode rounds (default %(default)s)")
    b.add_argument("--warmup", type=NON_NEGATIVE, default=3, help="untimed rounds first (default %(default)s)")
    b.add_argument("--threads", type=POSITIVE, default=None, help="ONNX Runtime and torch threads")
    b.add_argument("--no-torch", action="store_true", help="skip the eager PyTorch rows")
    b.add_argument("--out", type=OUTPUT_FILE, help="write the cqil-bench/1 JSON here (e.g. latency.json; chart beside it)")
    b.add_argument("--chart", type=OUTPUT_FILE, help="PNG chart path (default: --out with .png)")
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    cost = b.add_argument_group("cost model (for `cqil plan --auto --latency-budget`)")
    cost.add_argument("--cost-model", type=OUTPUT_FILE, metavar="COST.json",
                      help="measure per-layer and per-group decode costs of --model on ONNX Runtime CPU into this file")
    cost.add_argument("--cost-max-group-size", type=at_least(2), default=4, metavar="P",
                      help="largest group measured (default %(default)s)")
    cost.add_argument("--cost-layouts", type=TEXT, default="branches,fused", metavar="L,...",
                      help="export layouts measured (default %(default)s)")
    add_rank_options(b, plan_options=True)
    b.set_defaults(func=cmd_bench)
