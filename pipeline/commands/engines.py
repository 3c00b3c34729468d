"""Engine commands: `cqil engine` (TensorRT build, or its build script) and `cqil gate` (latency gate)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_engine(args: argparse.Namespace) -> None:
    from engines import tensorrt as trt_engine

    options = trt_engine.EngineOptions(
        precision=args.precision, aux_streams=args.aux_streams, opt_batch=args.opt_batch,
        max_batch=args.max_batch, opt_seq=args.opt_seq, max_seq=args.max_seq, opt_past=args.opt_past,
        max_context=args.max_context, workspace_mib=args.workspace_mib, timing_cache=args.timing_cache)
    settings = trt_engine.engine_settings(args.onnx, args.out, options)
    written = trt_engine.write_engine_files(settings, settings.onnx.parent)
    spec = settings.spec
    groups = f"plan {spec.plan.describe()}" if spec.plan else "no plan metadata"
    print(f"{settings.onnx}: {spec.num_layers} layers, cache {spec.kv_dtype}, {groups}")
    print(f"profiles: prefill {_describe(settings.profiles[0])}; decode {_describe(settings.profiles[1])}")
    print(f"max_aux_streams {settings.aux_streams}, precision {options.precision}")
    print(f"wrote {written['build_engine.sh']} (polygraphy convert), {written['check_engine.sh']} "
          f"(polygraphy run --onnxrt --trt) and {written['data_loader.py']} for a GPU host")
    if trt_engine.import_tensorrt() is None:
        print(f"TensorRT is not installed here: the engine was NOT built and {args.out} was not written. "
              f"Run {written['build_engine.sh']} on a GPU host with TensorRT 10.")
        return
    trt_engine.build_engine(settings)
    print(f"built {settings.engine}; layer information {settings.layer_info}; timing cache {settings.timing_cache}")


def _describe(profile) -> str:
    ids, past = profile["input_ids"], profile["past_key_values.0.key"]
    return (f"input_ids {ids.min}..{ids.max} (opt {ids.opt}), "
            f"past {past.min[2]}..{past.max[2]} (opt {past.opt[2]})")


def cmd_gate(args: argparse.Namespace) -> int:
    from engines import gate
    from pipeline.model.errors import CqilError
    from pipeline.model.fsutil import atomic_write_text

    if args.tolerance is not None and args.baseline is None:
        raise CqilError("--tolerance applies only with --baseline")
    bench = gate.load_bench(args.bench)
    if args.baseline is not None:
        tolerance = gate.DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance
        checks = gate.check_baseline(bench, gate.load_bench(args.baseline), tolerance)
        rule = f"baseline {args.baseline} tolerance {tolerance:g}"
    else:
        checks = gate.check_max_ratio(bench, args.max_ratio)
        rule = f"max ratio {args.max_ratio:g}"
    result = gate.gate_result(checks, rule)
    for check in checks:
        print(f"{'PASS' if check.passed else 'FAIL'} {check.scenario}: {check.detail}")
    print(f"gate {'passed' if result['passed'] else 'FAILED'} ({rule})")
    if args.junit:
        atomic_write_text(args.junit, gate.junit_xml(checks, rule))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0 if result["passed"] else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("engine", help="build a TensorRT engine from the ONNX with Polygraphy; always writes "
                                      "build_engine.sh, check_engine.sh and data_loader.py beside it")
    p.add_argument("--onnx", type=Path, required=True, help="exported ONNX file or its directory")
    p.add_argument("--out", type=Path, required=True, help="engine file to write, e.g. trt/model.plan")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32")
    p.add_argument("--aux-streams", type=int, default=None,
                   help="max_aux_streams (default: largest group size - 1, from the ONNX plan metadata)")
    p.add_argument("--opt-batch", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=1)
    p.add_argument("--opt-seq", type=int, default=128, help="prefill tokens the engine is tuned for")
    p.add_argument("--max-seq", type=int, default=512, help="most prefill tokens")
    p.add_argument("--opt-past", type=int, default=256, help="decode cache length the engine is tuned for")
    p.add_argument("--max-context", type=int, default=1024, help="most past + new tokens")
    p.add_argument("--workspace-mib", type=int, default=None, help="builder workspace limit")
    p.add_argument("--timing-cache", type=Path, default=None, help="timing cache file (default: beside the engine)")
    p.set_defaults(func=cmd_engine)

    p = sub.add_parser("gate", help="pass/fail a bench result against a baseline or a ratio limit (exit 0 pass, 1 fail, 2 bad input)")
    p.add_argument("bench", type=Path, help="bench JSON (cqil-bench/1)")
    rule = p.add_mutually_exclusive_group(required=True)
    rule.add_argument("--baseline", type=Path, help="an earlier bench JSON to compare ratios with")
    rule.add_argument("--max-ratio", type=float, help="largest allowed candidate/reference ratio")
    p.add_argument("--tolerance", type=float, default=None,
                   help="with --baseline: allowed relative ratio increase (default 0.05)")
    p.add_argument("--junit", type=Path, help="write a JUnit XML report here")
    p.add_argument("--json", type=Path, help="write the gate result as JSON here")
    p.set_defaults(func=cmd_gate)

