"""Foundation commands: analyze, plan, eval, generate."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.cli import (
    add_data_options,
    add_model_options,
    add_plan_options,
    limit_chunks,
    plan_from_args,
)
from pipeline.commands.autoplan import add_auto_options, auto_requested, cmd_auto_plan
from pipeline.commands.ranks import add_rank_options


def cmd_plan(args: argparse.Namespace) -> None:
    if auto_requested(args):
        return cmd_auto_plan(args)
    from transformers import AutoConfig

    from pipeline.model import plan as plans
    from pipeline.sources import check_model_dir, resolve_model_dir

    path = resolve_model_dir(args.model)
    check_model_dir(path)
    config = AutoConfig.from_pretrained(path)
    if args.official:
        plan = plans.load_plan(args.official, config.num_hidden_layers)
        plan = plans.Plan(plan.groups, plan.bypass if args.bypass is None else args.bypass,
                          plans.model_record(config))
    else:
        plan = plan_from_args(args, config)
    plan.check_fits(config)
    plan.save(args.out)
    print(f"{args.out}: {plan.describe()}")


def cmd_analyze(args: argparse.Namespace) -> None:
    from pipeline.analysis import (
        layer_input_similarity,
        save_heatmap,
        similarity_report,
    )
    from pipeline.model.cqil import CqilModel
    from pipeline.data import load_split
    from pipeline.model.fsutil import atomic_dir
    from pipeline.model.plan import identity_plan
    from pipeline.sources import load_model

    loaded = load_model(args.model)
    split = load_split(loaded.tokenizer, args.data, args.eval_data, args.seq_len)
    chunks = limit_chunks(split.train, args.max_chunks)
    model = CqilModel(loaded.model, identity_plan(loaded.model.config.num_hidden_layers))
    matrix = layer_input_similarity(model, chunks, args.batch_size)
    report = similarity_report(matrix, chunks.numel(), loaded.name)
    report["data"] = split.source
    with atomic_dir(args.out) as tmp:
        (tmp / "similarity.json").write_text(json.dumps(report, indent=2) + "\n")
        save_heatmap(matrix, tmp / "similarity.png",
                     f"{loaded.name}: layer-input cosine similarity ({chunks.numel()} tokens)")
    print(f"layer-input cosine similarity, {loaded.name}, {chunks.numel()} tokens")
    print(" layer  cos(x_i, x_i+1)")
    for i, value in enumerate(report["adjacent"]):
        print(f"{i:>3}-{i + 1:<3} {value:.4f}  {'#' * round(40 * max(value, 0))}")
    print(f"wrote {args.out}/similarity.json and similarity.png")


def cmd_eval(args: argparse.Namespace) -> None:
    from pipeline.commands.recover import plan_with_adapter
    from pipeline.comparison import LABELS, comparison_models
    from pipeline.data import load_split
    from pipeline.quality import evaluate
    from pipeline.sources import load_model

    loaded = load_model(args.model)
    config = loaded.model.config
    plan = plan_with_adapter(args, config)
    original, candidates, provenance = comparison_models(loaded, plan, args.adapter, args.base_model)
    split = load_split(loaded.tokenizer, args.data, args.eval_data, args.seq_len)
    chunks = limit_chunks(split.held_out, args.max_chunks)
    result = evaluate(original, candidates, chunks, args.batch_size)
    result["plan"] = plan.to_dict()
    result["model"] = loaded.name
    result["data"] = split.source
    result.update(provenance)
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
        label = LABELS[name] if provenance else name
        print(f"{label:<13} {row['ppl']:>9.3f} {kl:>9} {top1:>7}")
    print(f"{result['tokens_per_s']} tokens/s ({result['seconds']} s)")


def cmd_generate(args: argparse.Namespace) -> int | None:
    if args.ranks is not None:  # --ranks P: the same generation on P processes (pipeline/commands/ranks.py)
        from pipeline.commands.ranks import launch_generate

        return launch_generate(args)
    from pipeline.model.cqil import CqilModel, greedy_generate
    from pipeline.model.plan import identity_plan
    from pipeline.sources import load_model

    loaded = load_model(args.model)
    config = loaded.model.config
    plan = plan_from_args(args, config, required=False) or identity_plan(config.num_hidden_layers)
    tokenizer = loaded.tokenizer
    prompts = args.prompt
    if not args.raw and getattr(tokenizer, "chat_template", None):
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in prompts]
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    model = CqilModel(loaded.model, plan)
    new = greedy_generate(model, batch["input_ids"], batch["attention_mask"], args.max_new_tokens,
                          tokenizer.eos_token_id)
    for prompt, tokens in zip(args.prompt, new):
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        print(f"> {prompt}\n{text.strip()}\n" if len(args.prompt) > 1 else text.strip())


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="layer-input cosine similarity (JSON + heatmap PNG)")
    add_model_options(p)
    add_data_options(p)
    p.set_defaults(max_chunks=32)
    p.add_argument("--out", type=Path, default=Path("analysis"), help="output directory (default %(default)s)")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("plan", help="write plan.json from explicit groups, a uniform S:E:P spec, an official config, or --auto search")
    add_model_options(p)
    add_plan_options(p)
    p.add_argument("--official", type=Path, help="official CQIL config (JSON with cqil_layers and d)")
    p.add_argument("--out", type=Path, default=Path("plan.json"), help="output file (default %(default)s)")
    add_auto_options(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("eval", help="held-out perplexity, KL and top-1 of the original and the CQIL model")
    add_model_options(p)
    add_plan_options(p)
    add_data_options(p)
    p.add_argument("--adapter", type=Path, help="peft LoRA adapter: also report CQIL+adapter")
    p.add_argument("--base-model", help="for a merged CQIL checkpoint: the model it was merged from "
                   "(default: the one recorded in its config)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="greedy generation with the KV cache")
    add_model_options(p)
    add_plan_options(p)
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--raw", action="store_true", help="do not apply the tokenizer's chat template")
    add_rank_options(p)
    p.set_defaults(func=cmd_generate)
