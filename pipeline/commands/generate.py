"""`cqil generate`: greedy generation with the KV cache, under a plan or the original model."""

from __future__ import annotations

import argparse

from cqil.pipeline.commands.options import (
    POSITIVE,
    TEXT,
    add_model_options,
    add_plan_options,
)
from cqil.pipeline.commands.ranks import add_rank_options


def cmd_generate(args: argparse.Namespace) -> int | None:
    if args.ranks is not None:  # --ranks P: the same generation on P processes (pipeline/commands/ranks.py)
        from cqil.pipeline.commands.ranks import launch_generate

        return launch_generate(args)
    from cqil.model.cqil import CqilModel, greedy_generate
    from cqil.model.plan import identity_plan
    from cqil.pipeline.plan_choice import PlanChoice, resolve_plan
    from cqil.pipeline.sources import load_model

    choice = PlanChoice.from_args(args)
    choice.check()
    loaded = load_model(args.model)
    config = loaded.model.config
    plan = resolve_plan(choice, config, required=False) or identity_plan(config.num_hidden_layers)
    tokenizer = loaded.tokenizer
    ids, mask = encode_prompts(tokenizer, args.prompt, args.raw)
    check_context(config, ids.shape[1], args.max_new_tokens)
    new = greedy_generate(CqilModel(loaded.model, plan), ids, mask, args.max_new_tokens, tokenizer.eos_token_id)
    print(format_generations(tokenizer, args.prompt, new))


def check_context(config, prompt_tokens: int, new_tokens: int) -> None:
    """The rule of the Triton text model: prompt + new tokens must fit the model's positions."""
    from cqil.model.errors import CqilError

    context = getattr(config, "max_position_embeddings", None)
    if context and prompt_tokens + new_tokens > context:
        raise CqilError(f"the prompt ({prompt_tokens} tokens) plus --max-new-tokens {new_tokens} exceeds the model's "
                        f"context of {context} tokens: shorten one of them")


def encode_prompts(tokenizer, prompts: list[str], raw: bool):
    """Prompts as a left-padded batch (the chat template applied unless `raw`): (input_ids, attention_mask)."""
    if not raw and getattr(tokenizer, "chat_template", None):
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in prompts]
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return batch["input_ids"], batch["attention_mask"]


def format_generations(tokenizer, prompts: list[str], new_tokens) -> str:
    """What `cqil generate` prints: the text alone for one prompt, '> prompt' headed blocks for several."""
    lines = []
    for prompt, tokens in zip(prompts, new_tokens):
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        lines.append(f"> {prompt}\n{text.strip()}\n" if len(prompts) > 1 else text.strip())
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="greedy generation with the KV cache")
    add_model_options(p)
    add_plan_options(p)
    p.add_argument("--prompt", type=TEXT, action="append", required=True, help="prompt (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=64, help="tokens to generate (default %(default)s)")
    p.add_argument("--raw", action="store_true", help="do not apply the tokenizer's chat template")
    add_rank_options(p)
    p.set_defaults(func=cmd_generate)
