"""`cqil bench`: latency of the original vs the CQIL model on ONNX Runtime, interleaved."""

from __future__ import annotations

import argparse
import json

from cqil.pipeline.commands.onnx_source import load_source, onnx_and_plan, write_json
from cqil.pipeline.commands.options import (
    INPUT_PATH,
    JSON_FILE,
    NON_NEGATIVE,
    OUTPUT_FILE,
    POSITIVE,
    add_model_options,
)
from cqil.pipeline.commands.ranks import add_rank_options


def cmd_bench(args: argparse.Namespace) -> int | None:
    from cqil.model.errors import CqilError

    if args.ranks is not None:  # --ranks P: one process vs TP vs CQIL on P processes (pipeline/commands/ranks.py)
        from cqil.pipeline.commands.ranks import launch_bench

        if args.schedule != "sequential":
            raise CqilError(f"--schedule {args.schedule} is for the one-process PyTorch rows; --ranks runs CQIL's "
                            "per-rank schedule: drop one of them")
        return launch_bench(args)
    if args.onnx is None:
        raise CqilError("--onnx is required (or --ranks P for the multi-process bench of the PyTorch model)")
    from cqil.engines.bench import BenchSettings, run_bench, schedule_models
    from cqil.engines.bench_report import plot_bench, report_lines
    from cqil.model.fsutil import check_output_file
    from cqil.pipeline.reference import cached_reference

    settings = BenchSettings(batch=args.batch, seq=args.seq, past=args.past, prefill_repeats=args.prefill_repeats,
                             decode_repeats=args.decode_repeats, warmup=args.warmup, threads=args.threads,
                             schedule=args.schedule)
    chart = args.chart or (args.out.with_suffix(".png") if args.out else None)
    if chart is not None:
        check_output_file(chart, "--chart")
    onnx_path, spec, plan = onnx_and_plan(args)
    reference = args.reference or cached_reference(spec, onnx_path, args.model)
    torch_models = None
    if not args.no_torch:
        loaded = load_source(args, spec, onnx_path, plan)
        torch_models = schedule_models(loaded.model, plan, settings.schedule)
    result = run_bench(onnx_path, reference, settings, torch_models)
    if chart is not None:
        plot_bench(result, chart)
        result["chart"] = str(chart)
    write_json(args.out, result)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print("\n".join(report_lines(result, f"{onnx_path} ({result['candidate']['plan']}) vs {result['reference']['onnx']}, "
                                          f"{', '.join(result['providers'])}, threads {settings.threads or 'default'}, "
                                          f"PyTorch schedule {settings.schedule}")))


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
    b.add_argument("--schedule", choices=("sequential", "streams", "packed"), default="sequential",
                   help="how the PyTorch rows run a group: sequential, streams (CUDA) or packed (default %(default)s)")
    b.add_argument("--out", type=OUTPUT_FILE, help="write the cqil-bench/1 JSON here (e.g. latency.json; chart beside it)")
    b.add_argument("--chart", type=OUTPUT_FILE, help="PNG chart path (default: --out with .png)")
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    add_rank_options(b, plan_options=True)
    b.set_defaults(func=cmd_bench)
