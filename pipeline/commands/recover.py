"""Recovery commands: finetune (LoRA self-distillation) and merge (adapter into a CQIL checkpoint)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli import (
    add_data_options,
    add_model_options,
    add_plan_options,
    limit_chunks,
    plan_from_args,
)


def plan_with_adapter(args: argparse.Namespace, config):
    """The plan from the command line or the checkpoint, else the one the adapter was trained for."""
    from pipeline.adapters import adapter_plan
    from pipeline.model.errors import CqilError

    plan = plan_from_args(args, config, required=False)
    if plan is None and getattr(args, "adapter", None):
        try:
            plan = adapter_plan(args.adapter, config.num_hidden_layers)
            if plan is not None:
                plan.check_fits(config)
        except CqilError as exc:
            raise CqilError(f"adapter '{args.adapter}' was trained for another model ({exc})") from exc
    return plan or plan_from_args(args, config)  # no plan anywhere: the usual error


def cmd_finetune(args: argparse.Namespace) -> None:
    from pipeline.data import load_split
    from pipeline.recovery import FinetuneSettings, finetune, summary_line
    from pipeline.sources import load_model

    loaded = load_model(args.model)
    plan = plan_from_args(args, loaded.model.config)
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


def cmd_merge(args: argparse.Namespace) -> None:
    from pipeline.merge import merge_adapter
    from pipeline.sources import load_model

    loaded = load_model(args.model)
    plan = plan_with_adapter(args, loaded.model.config)
    merge_adapter(loaded, plan, args.adapter, args.out)
    print(f"wrote {args.out}: {loaded.name} + {args.adapter}, {plan.describe()}")


def register(sub: argparse._SubParsersAction) -> None:
    from pipeline.adapters import DEFAULT_RANK, DEFAULT_TARGETS

    p = sub.add_parser("finetune", help="recover quality: LoRA self-distillation of the CQIL model towards the original")
    add_model_options(p)
    add_plan_options(p)
    add_data_options(p, batch_size=4)
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--out", type=Path, default=Path("adapter"), help="adapter directory (default %(default)s)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default %(default)s, official)")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default 5%% of --steps)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default %(default)s)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping, 0 = off (default %(default)s)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed for LoRA init and data order (default %(default)s)")
    p.add_argument("--rank", type=int, default=DEFAULT_RANK, help="LoRA rank r (default %(default)s)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: = rank)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (default %(default)s)")
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                   help="modules to adapt in every layer (default %(default)s)")
    p.add_argument("--eval-every", type=int, default=50, help="held-out KL/PPL every K steps, 0 = only at the end")
    p.add_argument("--eval-chunks", type=int, default=16, help="held-out chunks per evaluation (default %(default)s)")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every K steps, 0 = never (Ctrl-C still saves)")
    p.add_argument("--checkpoint-dir", type=Path, default=None, help="default: <out>.checkpoint")
    p.add_argument("--resume", action="store_true", help="continue the run saved in the checkpoint")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("merge", help="merge an adapter into the weights: a CQIL checkpoint that carries its plan")
    add_model_options(p)
    add_plan_options(p)
    p.add_argument("--adapter", type=Path, required=True, help="peft LoRA adapter directory")
    p.add_argument("--out", type=Path, default=Path("model"), help="output directory (default %(default)s)")
    p.set_defaults(func=cmd_merge)
