"""`cqil finetune`: recover quality by LoRA self-distillation of the CQIL model towards the original."""

from __future__ import annotations

import argparse

from cqil.model.fsutil import check_output_dir
from cqil.pipeline.commands.options import (
    OUTPUT_DIR,
    add_data_options,
    TrainingMix,
    add_model_options,
    add_plan_options,
    limit_chunks,
)
from cqil.pipeline.data import check_mix, load_split, mixed_training
from cqil.pipeline.plan_choice import load_model_and_plan
from cqil.pipeline.recovery_settings import FinetuneSettings
from cqil.pipeline.settings import add_flags, from_args


def cmd_finetune(args: argparse.Namespace) -> None:
    from cqil.pipeline.recovery import default_checkpoint_dir, summary_line

    settings = from_args(FinetuneSettings, args)
    mix = from_args(TrainingMix, args)
    check_mix(mix.mix, args.data, args.eval_data)
    if args.checkpoint_dir is None:
        check_output_dir(default_checkpoint_dir(args.out), "--checkpoint-dir (default <out>.checkpoint)")
    loaded, plan = load_model_and_plan(args)
    split = load_split(loaded.tokenizer, args.data, args.eval_data, args.seq_len)
    own = limit_chunks(split.train, args.max_chunks)
    train = mixed_training(loaded.tokenizer, own, mix.mix, mix.mix_fraction)
    mixed = f"; {len(train) - len(own)} more training chunks from {mix.mix}" if len(train) > len(own) else ""
    print(f"{loaded.name}: {plan.describe()}; {split.describe()}{mixed}")
    record = run(settings, loaded, plan, train, split.held_out, args.out,
                 args.checkpoint_dir, args.resume, source={"name": loaded.name, "path": str(loaded.path)})
    print(f"wrote {args.out}: {summary_line(record)}")


def run(settings: FinetuneSettings, loaded, plan, train, held_out, out, checkpoint_dir=None, resume: bool = False,
        source: dict | None = None) -> dict:
    """LoRA self-distillation of the loaded model under `plan` (adapter written to `out`): the run record.
    What both `cqil finetune` and the build's recover stage run."""
    from cqil.pipeline.recovery import finetune

    return finetune(loaded.model, plan, train, held_out, settings, out, checkpoint_dir, resume,
                    source=source or {"name": loaded.name})


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="recover quality: LoRA self-distillation of the CQIL model towards the original")
    add_model_options(p)
    add_plan_options(p)
    add_data_options(p, batch_size=FinetuneSettings.batch_size)
    add_flags(p, TrainingMix)
    add_flags(p, FinetuneSettings, skip=("batch_size",))  # --batch-size is a data option
    p.add_argument("--out", type=OUTPUT_DIR, default="adapter", help="adapter directory (default %(default)s)")
    p.add_argument("--checkpoint-dir", type=OUTPUT_DIR, default=None, help="default: <out>.checkpoint")
    p.add_argument("--resume", action="store_true", help="continue the run saved in the checkpoint")
    p.set_defaults(func=cmd_finetune)
