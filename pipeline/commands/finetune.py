"""`cqil finetune`: recover quality by LoRA self-distillation of the CQIL model towards the original."""

from __future__ import annotations

import argparse

from cqil.pipeline.commands.options import (
    NON_NEGATIVE,
    NON_NEGATIVE_NUMBER,
    OUTPUT_DIR,
    POSITIVE,
    POSITIVE_NUMBER,
    TEXT,
    add_data_options,
    add_model_options,
    add_plan_options,
    limit_chunks,
    number,
)


def cmd_finetune(args: argparse.Namespace) -> None:
    from cqil.model.fsutil import check_output_dir
    from cqil.pipeline.data import load_split
    from cqil.pipeline.plan_choice import PlanChoice, resolve_plan
    from cqil.pipeline.recovery import FinetuneSettings, default_checkpoint_dir, finetune, summary_line
    from cqil.pipeline.sources import load_model

    choice = PlanChoice.from_args(args)
    choice.check()
    if args.checkpoint_dir is None:
        check_output_dir(default_checkpoint_dir(args.out), "--checkpoint-dir (default <out>.checkpoint)")
    loaded = load_model(args.model)
    plan = resolve_plan(choice, loaded.model.config)
    split = load_split(loaded.tokenizer, args.data, args.eval_data, args.seq_len)
    settings = FinetuneSettings(
        steps=args.steps, lr=args.lr,
        warmup_steps=args.warmup_steps if args.warmup_steps is not None else args.steps // 20,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, batch_size=args.batch_size,
        grad_accum=args.grad_accum, seed=args.seed, rank=args.rank, alpha=args.alpha, dropout=args.lora_dropout,
        targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
        eval_every=args.eval_every, eval_chunks=args.eval_chunks, save_every=args.save_every,
    )
    print(f"{loaded.name}: {plan.describe()}; {split.describe()}")
    record = finetune(loaded.model, plan, limit_chunks(split.train, args.max_chunks), split.held_out, settings,
                      args.out, args.checkpoint_dir, args.resume,
                      source={"name": loaded.name, "path": str(loaded.path)})
    print(f"wrote {args.out}: {summary_line(record)}")


def register(sub: argparse._SubParsersAction) -> None:
    from cqil.pipeline.adapters import DEFAULT_RANK, DEFAULT_TARGETS

    p = sub.add_parser("finetune", help="recover quality: LoRA self-distillation of the CQIL model towards the original")
    add_model_options(p)
    add_plan_options(p)
    add_data_options(p, batch_size=4)
    p.add_argument("--steps", type=POSITIVE, required=True, help="optimizer steps")
    p.add_argument("--out", type=OUTPUT_DIR, default="adapter", help="adapter directory (default %(default)s)")
    p.add_argument("--lr", type=POSITIVE_NUMBER, default=1e-4, help="peak learning rate (default %(default)s, official)")
    p.add_argument("--warmup-steps", type=NON_NEGATIVE, default=None, help="linear warm-up steps (default 5%% of --steps)")
    p.add_argument("--weight-decay", type=NON_NEGATIVE_NUMBER, default=0.1, help="AdamW weight decay (default %(default)s)")
    p.add_argument("--max-grad-norm", type=NON_NEGATIVE_NUMBER, default=1.0,
                   help="gradient clipping, 0 = off (default %(default)s)")
    p.add_argument("--grad-accum", type=POSITIVE, default=1, help="micro-batches per step (default %(default)s)")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed for LoRA init and data order (default %(default)s)")
    p.add_argument("--rank", type=POSITIVE, default=DEFAULT_RANK, help="LoRA rank r (default %(default)s)")
    p.add_argument("--alpha", type=POSITIVE_NUMBER, default=None, help="LoRA alpha (default: = rank)")
    p.add_argument("--lora-dropout", type=number(lambda v: 0 <= v < 1, "must be in [0, 1)"), default=0.0,
                   help="LoRA dropout (default %(default)s)")
    p.add_argument("--targets", type=TEXT, default=",".join(DEFAULT_TARGETS),
                   help="modules to adapt in every layer (default %(default)s)")
    p.add_argument("--eval-every", type=NON_NEGATIVE, default=50, help="held-out KL/PPL every K steps, 0 = only at the end")
    p.add_argument("--eval-chunks", type=POSITIVE, default=16, help="held-out chunks per evaluation (default %(default)s)")
    p.add_argument("--save-every", type=NON_NEGATIVE, default=50,
                   help="checkpoint every K steps, 0 = never (Ctrl-C still saves)")
    p.add_argument("--checkpoint-dir", type=OUTPUT_DIR, default=None, help="default: <out>.checkpoint")
    p.add_argument("--resume", action="store_true", help="continue the run saved in the checkpoint")
    p.set_defaults(func=cmd_finetune)
