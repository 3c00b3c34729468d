"""`cqil validate`: outputs of each engine vs the PyTorch reference (exit 1 when a check fails)."""

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
    TEXT_SOURCE,
    add_model_options,
    at_least,
    input_file,
)


def cmd_validate(args: argparse.Namespace) -> int:
    from cqil.engines.validate import summary_lines, validate_onnx
    from cqil.model.cqil import CqilModel
    from cqil.pipeline.data import load_split

    onnx_path, spec, plan = onnx_and_plan(args)
    loaded = load_source(args, spec, onnx_path, plan)
    chunks = load_split(loaded.tokenizer, args.data, args.eval_data, args.seq_len).held_out[: args.chunks]
    result = validate_onnx(onnx_path, CqilModel(loaded.model, plan), chunks, args.decode_steps,
                           engine=args.engine, threads=args.threads)
    result["reference_model"] = {"name": loaded.name, "path": str(loaded.path)}
    write_json(args.out, result)
    print(json.dumps(result, indent=2) if args.json else "\n".join(summary_lines(result)))
    return 0 if result["passed"] else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="outputs of each engine vs the PyTorch reference (exit 1 on failure)")
    p.add_argument("--onnx", type=INPUT_PATH, required=True, help="the folder (or .onnx file) written by cqil export")
    add_model_options(p)
    p.add_argument("--plan", type=JSON_FILE, help="plan.json; must match the plan stored in the ONNX")
    p.add_argument("--engine", type=input_file("build it with `cqil engine`"),
                   help="a TensorRT engine of the same ONNX (validated where TensorRT imports)")
    p.add_argument("--data", type=TEXT_SOURCE, help=".txt, directory of .txt, or .jsonl (default: pydoc_data.topics)")
    p.add_argument("--eval-data", type=TEXT_SOURCE, help="held-out text used whole (default: last 10%% of --data)")
    p.add_argument("--seq-len", type=at_least(2), default=128, help="tokens per chunk (default %(default)s)")
    p.add_argument("--chunks", type=POSITIVE, default=2, help="held-out chunks to compare on (default %(default)s)")
    p.add_argument("--decode-steps", type=NON_NEGATIVE, default=8,
                   help="last tokens of each chunk decoded one by one with the cache (default %(default)s)")
    p.add_argument("--threads", type=POSITIVE, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--out", type=OUTPUT_FILE, help="write the result JSON here (e.g. validation.json)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_validate)
