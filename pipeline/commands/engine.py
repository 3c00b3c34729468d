"""`cqil engine`: a TensorRT engine from the ONNX, or its build script where TensorRT is absent."""

from __future__ import annotations

import argparse

from pipeline.commands.options import INPUT_PATH, OUTPUT_FILE, POSITIVE, NON_NEGATIVE


def cmd_engine(args: argparse.Namespace) -> None:
    from engines import tensorrt as trt_engine

    settings = trt_engine.EngineSettings(
        precision=args.precision, aux_streams=args.aux_streams, opt_batch=args.opt_batch,
        max_batch=args.max_batch, opt_seq=args.opt_seq, max_seq=args.max_seq, opt_past=args.opt_past,
        max_context=args.max_context, workspace_mib=args.workspace_mib, timing_cache=args.timing_cache)
    build = trt_engine.plan_build(args.onnx, args.out, settings)
    script = trt_engine.write_build_script(build.onnx.parent, build)
    groups = f"plan {build.spec.plan.describe()}" if build.spec.plan else "no plan metadata"
    print(f"{build.onnx}: {build.spec.num_layers} layers, cache {build.spec.kv_dtype}, {groups}")
    print(f"profiles: prefill {_describe(build.profiles[0])}; decode {_describe(build.profiles[1])}")
    print(f"max_aux_streams {build.aux_streams}, precision {settings.precision}")
    print(f"wrote {script} (builds the same engine with trtexec on a GPU host)")
    trt = trt_engine.import_tensorrt()
    if trt is None:
        print(f"TensorRT is not installed here: the engine was NOT built and {args.out} was not written. "
              f"Run {script} on a GPU host with TensorRT 10.")
        return
    trt_engine.build_engine(build, trt)
    print(f"built {build.engine}; layer information {build.layer_info}; timing cache {build.timing_cache}")


def _describe(profile) -> str:
    ids, past = profile["input_ids"], profile["past_key_values.0.key"]
    return (f"input_ids {ids.min}..{ids.max} (opt {ids.opt}), "
            f"past {past.min[2]}..{past.max[2]} (opt {past.opt[2]})")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("engine", help="build a TensorRT engine from the ONNX (or write build_engine.sh where "
                       "TensorRT is absent)")
    p.add_argument("--onnx", type=INPUT_PATH, required=True, help="exported ONNX file or its directory")
    p.add_argument("--out", type=OUTPUT_FILE, required=True, help="engine file to write, e.g. trt/model.plan")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32")
    p.add_argument("--aux-streams", type=NON_NEGATIVE, default=None,
                   help="max_aux_streams (default: largest group size - 1, from the ONNX plan metadata)")
    p.add_argument("--opt-batch", type=POSITIVE, default=1)
    p.add_argument("--max-batch", type=POSITIVE, default=1)
    p.add_argument("--opt-seq", type=POSITIVE, default=128, help="prefill tokens the engine is tuned for")
    p.add_argument("--max-seq", type=POSITIVE, default=512, help="most prefill tokens")
    p.add_argument("--opt-past", type=POSITIVE, default=256, help="decode cache length the engine is tuned for")
    p.add_argument("--max-context", type=POSITIVE, default=1024, help="most past + new tokens")
    p.add_argument("--workspace-mib", type=POSITIVE, default=None, help="builder workspace limit")
    p.add_argument("--timing-cache", type=OUTPUT_FILE, default=None,
                   help="timing cache file (default: beside the engine)")
    p.set_defaults(func=cmd_engine)
