"""`cqil export`: the CQIL model (or the original, with --original) as an ONNX folder."""

from __future__ import annotations

import argparse
import json

from cqil.pipeline.commands.options import OUTPUT_DIR, POSITIVE, add_model_options, add_plan_options


def cmd_export(args: argparse.Namespace) -> None:
    from cqil.export.precision import TRACE_DTYPES
    from cqil.export.writer import check_options, export_model
    from cqil.model.cqil import CqilModel
    from cqil.model.errors import CqilError
    from cqil.pipeline.plan_choice import PlanChoice, resolve_plan
    from cqil.pipeline.sources import load_model

    if args.dtype is not None:
        raise CqilError(f"--dtype is now --precision (fp32, fp16, int8, int4): use --precision {args.dtype}")
    check_options(args.layout, args.precision, args.block_size, args.target)
    choice = PlanChoice.from_args(args)
    choice.check()
    loaded = load_model(args.model, dtype=str(TRACE_DTYPES[args.precision]).removeprefix("torch."))
    plan = resolve_plan(choice, loaded.model.config)
    model = CqilModel(loaded.model, plan)
    result = export_model(model, args.out, args.layout, args.precision,
                          source={"name": loaded.name, "path": str(loaded.path)}, tokenizer=loaded.tokenizer,
                          external_data=True if args.external_data else None, block_size=args.block_size,
                          target=args.target)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    print(f"{result.path}: {loaded.name}, {plan.describe()}, layout {result.layout}, {result.precision}")
    data = " (weights in model.onnx.data)" if result.external_data else ""
    print(f"{result.nodes} nodes, {result.size_bytes / 1e6:.1f} MB{data}; "
          f"{result.seconds:.1f} s, peak memory {result.peak_rss_mb:.0f} MB")
    if result.structure is not None:
        print(result.structure.describe())


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="ONNX with explicit parallel branches per group and a KV cache")
    add_model_options(p)
    add_plan_options(p)
    p.add_argument("--original", action="store_true",
                   help="export the original model (every layer alone): the reference for cqil bench")
    p.add_argument("--out", type=OUTPUT_DIR, default="onnx", help="output directory (default %(default)s)")
    p.add_argument("--layout", default="branches",
                   help="branches (one branch per layer of a group, default) or fused (wide operations)")
    p.add_argument("--target", default="portable",
                   help="portable (standard operators: TensorRT and any runtime; default) or onnxruntime (its fused "
                        "GroupQueryAttention, RotaryEmbedding, SkipSimplifiedLayerNormalization: the GenAI model "
                        "builder's graph with the CQIL groups)")
    p.add_argument("--precision", default="fp32",
                   help="fp32 (default), fp16, or int8 / int4 weights (MatMulNBits, the logits layer in 8 bits)")
    p.add_argument("--block-size", type=POSITIVE, default=32,
                   help="int8/int4: weights quantized in blocks of this many along K (default %(default)s)")
    p.add_argument("--dtype", help=argparse.SUPPRESS)  # the old spelling of --precision: refused with a hint
    p.add_argument("--external-data", action="store_true",
                   help="always put the weights in model.onnx.data (default: past 64 MiB)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_export)
