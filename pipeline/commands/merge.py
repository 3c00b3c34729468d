"""`cqil merge`: merge an adapter into the weights, a CQIL checkpoint that carries its plan."""

from __future__ import annotations

import argparse
from pathlib import Path

from cqil.pipeline.commands.options import INPUT_FOLDER, OUTPUT_DIR, add_model_options, add_plan_options
from cqil.pipeline.merge import merge_adapter
from cqil.pipeline.plan_choice import load_model_and_plan


def cmd_merge(args: argparse.Namespace) -> None:
    loaded, plan = load_model_and_plan(args, adapter=args.adapter, strict=args.strict)
    run(loaded, plan, args.adapter, args.out)
    print(f"wrote {args.out}: {loaded.name} + {args.adapter}, {plan.describe()}")


def run(loaded, plan, adapter: Path | None, out: Path) -> None:
    """The loaded model under `plan`, with the LoRA `adapter` merged into its weights (None: none), saved at
    `out` as a CQIL checkpoint carrying its plan. What both `cqil merge` and the build's merge stage run."""
    merge_adapter(loaded, plan, adapter, out)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge an adapter into the weights: a CQIL checkpoint that carries its plan")
    add_model_options(p)
    add_plan_options(p)
    p.add_argument("--adapter", type=INPUT_FOLDER, required=True, help="peft LoRA adapter directory")
    p.add_argument("--out", type=OUTPUT_DIR, default="model", help="output directory (default %(default)s)")
    p.add_argument("--strict", action="store_true",
                   help="refuse an adapter distilled for another plan (default: a warning)")
    p.set_defaults(func=cmd_merge)
