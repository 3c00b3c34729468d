"""`cqil engine`: a TensorRT engine from the ONNX, or its build script where TensorRT is absent."""

from __future__ import annotations

import argparse

from cqil.pipeline.commands.options import INPUT_PATH, NON_NEGATIVE, OUTPUT_FILE, POSITIVE


def cmd_engine(args: argparse.Namespace) -> None:
    from cqil.engines.tensorrt.build import build_engine, import_tensorrt
    from cqil.engines.tensorrt.script import write_engine_files
    from cqil.engines.tensorrt.settings import EngineOptions, engine_settings

    options = EngineOptions(
        precision=args.precision, aux_streams=args.aux_streams, opt_batch=args.opt_batch,
        max_batch=args.max_batch, opt_seq=args.opt_seq, max_seq=args.max_seq, opt_past=args.opt_past,
        max_context=args.max_context, workspace_mib=args.workspace_mib, timing_cache=args.timing_cache)
    settings = engine_settings(args.onnx, args.out, options)
    written = write_engine_files(settings, settings.onnx.parent)
    spec = settings.spec
    groups = f"plan {spec.plan.describe()}" if spec.plan else "no plan metadata"
    print(f"{settings.onnx}: {spec.num_layers} layers, cache {spec.kv_dtype}, {groups}")
    print(f"profiles: prefill {_describe(settings.profiles[0])}; decode {_describe(settings.profiles[1])}")
    print(f"max_aux_streams {settings.aux_streams}, precision {options.precision}")
    print(f"wrote {written['build_engine.sh']} (polygraphy convert), {written['check_engine.sh']} "
          f"(polygraphy run --onnxrt --trt) and {written['data_loader.py']} for a GPU host")
    if import_tensorrt() is None:
        print(f"TensorRT is not installed here: the engine was NOT built and {args.out} was not written. "
              f"Run {written['build_engine.sh']} on a GPU host with TensorRT 10.")
        return
    build_engine(settings)
    print(f"built {settings.engine}; layer information {settings.layer_info}; timing cache {settings.timing_cache}")


def _describe(profile) -> str:
    ids, past = profile["input_ids"], profile["past_key_values.0.key"]
    return (f"input_ids {ids.min}..{ids.max} (opt {ids.opt}), "
            f"past {past.min[2]}..{past.max[2]} (opt {past.opt[2]})")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("engine", help="build a TensorRT engine from the ONNX with Polygraphy; always writes "
                                      "build_engine.sh, check_engine.sh and data_loader.py beside it")
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
