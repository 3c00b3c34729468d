"""`cqil generate`: greedy generation with the KV cache, under a plan or the original model."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass

from cqil.model.errors import CqilError
from cqil.model.plan import identity_plan
from cqil.model.settings import POSITIVE, TEXT, setting
from cqil.pipeline.commands.options import add_model_options, add_plan_options
from cqil.pipeline.commands.ranks import add_rank_options, launch_generate
from cqil.pipeline.plan_choice import load_model_and_plan
from cqil.pipeline.settings import add_flags, from_args


@dataclass(frozen=True)
class GenerateSettings:
    """What `cqil generate` (and each rank of `cqil generate --ranks P`) generates."""

    prompts: tuple[str, ...] = setting(MISSING, "prompt (repeat for a batch)", flags=("--prompt",), check=TEXT,
                                       many=True, toml=False)
    max_new_tokens: int = setting(64, "tokens to generate (default %(default)s)", check=POSITIVE, toml=False)
    raw: bool = setting(False, "do not apply the tokenizer's chat template", toml=False)


def cmd_generate(args: argparse.Namespace) -> int | None:
    settings = from_args(GenerateSettings, args)
    if args.ranks is not None:  # --ranks P: the same generation on P processes (pipeline/commands/ranks.py)
        return launch_generate(args, settings)

    loaded, plan = load_model_and_plan(args, required=False)
    print(run(settings, loaded, plan or identity_plan(loaded.model.config.num_hidden_layers)))


def run(settings: GenerateSettings, loaded, plan) -> str:
    """Greedy generation of the loaded model under `plan`: the text `cqil generate` prints."""
    from cqil.model.cqil import CqilModel
    from cqil.model.steps import greedy_generate

    tokenizer = loaded.tokenizer
    ids, mask = encode_prompts(tokenizer, list(settings.prompts), settings.raw)
    check_context(loaded.model.config, ids.shape[1], settings.max_new_tokens)
    new = greedy_generate(CqilModel(loaded.model, plan), ids, mask, settings.max_new_tokens, tokenizer.eos_token_id)
    return format_generations(tokenizer, list(settings.prompts), new)


def check_context(config, prompt_tokens: int, new_tokens: int) -> None:
    """The rule of the Triton text model: prompt + new tokens must fit the model's positions."""
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
    add_flags(p, GenerateSettings)
    add_rank_options(p)
    p.set_defaults(func=cmd_generate)
