"""`cqil eval`: held-out perplexity, KL and top-1 of the original and the CQIL model (and CQIL+adapter)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cqil.model.errors import CqilError
from cqil.pipeline.commands.options import (
    INPUT_FOLDER,
    INPUT_PATH,
    MODEL,
    add_data_options,
    add_model_options,
    add_plan_options,
    limit_chunks,
)
from cqil.pipeline.data import load_split
from cqil.pipeline.plan_choice import load_model_and_plan


def cmd_eval(args: argparse.Namespace) -> None:
    from cqil.pipeline.comparison import LABELS

    loaded, plan = load_model_and_plan(args, adapter=args.adapter, strict=args.strict)
    config = loaded.model.config
    context = getattr(config, "max_position_embeddings", None)
    if context and args.seq_len > context:  # the rule of the Triton text model: within the model's positions
        raise CqilError(f"--seq-len {args.seq_len} exceeds the model's context of {context} tokens: "
                        f"use at most {context}")
    split = load_split(loaded.tokenizer, args.data, args.eval_data, args.seq_len)
    chunks = limit_chunks(split.held_out, args.max_chunks)
    result, candidates = run(loaded, plan, chunks, args.batch_size, args.adapter, args.base_model, args.onnx)
    result["data"] = split.source
    provenance = "adapter" in result or "base_model" in result
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{loaded.name} on {split.source}: {len(chunks)} held-out chunks, {result['tokens']} tokens")
    print(f"plan: {plan.describe()}")
    print(f"{'model':<13} {'ppl':>9} {'kl':>9} {'top1':>7}")
    for name in ("original", *candidates):
        row = result[name]
        kl = f"{row['kl']:.4f}" if "kl" in row else "-"
        top1 = f"{row['top1']:.3f}" if "top1" in row else "-"
        label = LABELS[name] if provenance and name in LABELS else name.replace("_", " ")
        print(f"{label:<13} {row['ppl']:>9.3f} {kl:>9} {top1:>7}")
    print(f"{result['tokens_per_s']} tokens/s ({result['seconds']} s)")


def run(loaded, plan, chunks, batch_size: int, adapter: Path | None = None, base_model: str | None = None,
        onnx: Path | None = None):
    """Perplexity, KL and top-1 of the original and the loaded model under `plan` (with `adapter`, or against
    `base_model` for a merged checkpoint) on `chunks`, and with `onnx` (a quantized `cqil export` of it) that
    export and the original exported at the same precision: `cqil eval`'s result and its candidates' names."""
    from cqil.pipeline.comparison import comparison_models
    from cqil.pipeline.quality import at_precision, evaluate

    original, candidates, provenance = comparison_models(loaded, plan, adapter, base_model)
    if onnx is not None:
        candidates.update(at_precision(onnx, provenance.get("base_model", {}).get("path", loaded.path), plan))
    result = evaluate(original, candidates, chunks, batch_size)
    return {**result, "plan": plan.to_dict(), "model": loaded.name, **provenance}, list(candidates)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="held-out perplexity, KL and top-1 of the original and the CQIL model")
    add_model_options(p)
    add_plan_options(p)
    add_data_options(p)
    p.add_argument("--adapter", type=INPUT_FOLDER, help="peft LoRA adapter: also report CQIL+adapter")
    p.add_argument("--base-model", type=MODEL, help="for a merged CQIL checkpoint: the model it was merged from "
                   "(default: the one recorded in its config)")
    p.add_argument("--onnx", type=INPUT_PATH, help="a `cqil export` folder of this CQIL model at int8/int4/fp16: also "
                   "score it and the original exported at the same precision, side by side (ONNX Runtime)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--strict", action="store_true",
                   help="refuse an adapter distilled for another plan (default: a warning)")
    p.set_defaults(func=cmd_eval)
