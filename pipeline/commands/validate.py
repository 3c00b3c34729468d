"""`cqil validate` (engine outputs vs the PyTorch reference) and `cqil bench` (latency, reference vs CQIL)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.cli import add_model_options
from pipeline.model.errors import CqilError


def _onnx_and_plan(args: argparse.Namespace):
    """The ONNX file, its contract, and its plan (checked against --plan when given)."""
    from export.contract import find_onnx, read_contract
    from pipeline.model.plan import load_plan

    onnx_path = find_onnx(args.onnx)
    spec = read_contract(onnx_path)
    plan = spec.plan
    if args.plan is not None:
        given = load_plan(args.plan, spec.num_layers)
        if plan is not None and (given.groups, given.bypass) != (plan.groups, plan.bypass):
            raise CqilError(f"--plan {args.plan} ({given.describe()}) is not the plan '{onnx_path}' was exported "
                            f"with ({plan.describe()}): drop --plan or pass the matching ONNX")
        plan = plan or given
    if plan is None:
        raise CqilError(f"'{onnx_path}' carries no cqil.plan metadata: pass --plan with the plan it was exported with")
    return onnx_path, spec, plan


def _load_source(args: argparse.Namespace, spec, onnx_path: Path, plan):
    """The model to compare with: --model, else the one recorded in the ONNX (cqil.source_model)."""
    from pipeline.model.plan import plan_from_config
    from pipeline.sources import load_model

    source = args.model or spec.source_model().get("path")
    if not source:
        raise CqilError(f"'{onnx_path}' does not record its source model: pass --model")
    if not args.model and not Path(source).exists():
        raise CqilError(f"the source model recorded in '{onnx_path}' ({source}) is gone: pass --model")
    loaded = load_model(source)
    plan.check_fits(loaded.model.config)
    own = plan_from_config(loaded.model.config)
    if own is not None and (own.groups, own.bypass) != (plan.groups, plan.bypass):
        raise CqilError(f"--model carries its own plan ({own.describe()}), not the ONNX's ({plan.describe()}): "
                        "pass the checkpoint the ONNX was exported from")
    return loaded


def _write_json(path: Path | None, result: dict) -> None:
    from pipeline.model.fsutil import atomic_write_text

    if path is not None:
        atomic_write_text(path, json.dumps(result, indent=2) + "\n")


def cmd_validate(args: argparse.Namespace) -> int:
    from engines.validate import summary_lines, validate_onnx
    from pipeline.model.cqil import CqilModel
    from pipeline.data import load_split

    onnx_path, spec, plan = _onnx_and_plan(args)
    if args.engine is not None and not Path(args.engine).is_file():
        raise CqilError(f"--engine '{args.engine}' does not exist: build it with `cqil engine`")
    if args.chunks < 1:
        raise CqilError(f"--chunks {args.chunks} must be at least 1")
    loaded = _load_source(args, spec, onnx_path, plan)
    chunks = load_split(loaded.tokenizer, args.data, args.eval_data, args.seq_len).held_out[: args.chunks]
    result = validate_onnx(onnx_path, CqilModel(loaded.model, plan), chunks, args.decode_steps,
                           engine=args.engine, threads=args.threads)
    result["reference_model"] = {"name": loaded.name, "path": str(loaded.path)}
    _write_json(args.out, result)
    print(json.dumps(result, indent=2) if args.json else "\n".join(summary_lines(result)))
    return 0 if result["passed"] else 1


def cmd_bench(args: argparse.Namespace) -> None:
    from engines.bench import BenchSettings, cached_reference, run_bench
    from engines.bench_chart import plot_bench
    from pipeline.model.cqil import CqilModel
    from pipeline.model.plan import identity_plan

    settings = BenchSettings(batch=args.batch, seq=args.seq, past=args.past, prefill_repeats=args.prefill_repeats,
                             decode_repeats=args.decode_repeats, warmup=args.warmup, threads=args.threads)
    onnx_path, spec, plan = _onnx_and_plan(args)
    if args.reference is not None and not args.reference.exists():
        raise CqilError(f"--reference '{args.reference}' does not exist: pass the folder written by "
                        "`cqil export --original`, or leave --reference out to export it into the cache")
    reference = args.reference or cached_reference(spec, onnx_path, args.model)
    torch_models = None
    if not args.no_torch:
        loaded = _load_source(args, spec, onnx_path, plan)
        torch_models = {"reference": CqilModel(loaded.model, identity_plan(plan.num_layers)),
                        "candidate": CqilModel(loaded.model, plan)}
    result = run_bench(onnx_path, reference, settings, torch_models)
    chart = args.chart or (args.out.with_suffix(".png") if args.out else None)
    if chart is not None:
        plot_bench(result, chart)
        result["chart"] = str(chart)
    _write_json(args.out, result)
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


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="outputs of each engine vs the PyTorch reference (exit 1 on failure)")
    p.add_argument("--onnx", type=Path, required=True, help="the folder (or .onnx file) written by cqil export")
    add_model_options(p)
    p.add_argument("--plan", type=Path, help="plan.json; must match the plan stored in the ONNX")
    p.add_argument("--engine", type=Path, help="a TensorRT engine of the same ONNX (validated where TensorRT imports)")
    p.add_argument("--data", help=".txt, directory of .txt, or .jsonl (default: pydoc_data.topics)")
    p.add_argument("--eval-data", help="held-out text used whole (default: last 10%% of --data)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per chunk (default %(default)s)")
    p.add_argument("--chunks", type=int, default=2, help="held-out chunks to compare on (default %(default)s)")
    p.add_argument("--decode-steps", type=int, default=8,
                   help="last tokens of each chunk decoded one by one with the cache (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--out", type=Path, help="write the result JSON here (e.g. validation.json)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_validate)

    b = sub.add_parser("bench", help="latency of the original vs the CQIL model on ONNX Runtime, interleaved")
    b.add_argument("--onnx", type=Path, required=True, help="the candidate (CQIL) folder written by cqil export")
    b.add_argument("--reference", type=Path,
                   help="the original model's ONNX folder (default: exported once into the CQIL cache)")
    add_model_options(b)
    b.add_argument("--plan", type=Path, help="plan.json; must match the plan stored in the ONNX")
    b.add_argument("--batch", type=int, default=1, help="rows per call (default %(default)s)")
    b.add_argument("--seq", type=int, default=128, help="prefill tokens (default %(default)s)")
    b.add_argument("--past", type=int, default=128, help="decode context length (default %(default)s)")
    b.add_argument("--prefill-repeats", type=int, default=20, help="timed prefill rounds (default %(default)s)")
    b.add_argument("--decode-repeats", type=int, default=100, help="timed decode rounds (default %(default)s)")
    b.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default %(default)s)")
    b.add_argument("--threads", type=int, default=None, help="ONNX Runtime and torch threads")
    b.add_argument("--no-torch", action="store_true", help="skip the eager PyTorch rows")
    b.add_argument("--out", type=Path, help="write the cqil-bench/1 JSON here (e.g. latency.json; chart beside it)")
    b.add_argument("--chart", type=Path, help="PNG chart path (default: --out with .png)")
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    b.set_defaults(func=cmd_bench)
