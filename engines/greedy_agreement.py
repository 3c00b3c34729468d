"""Greedy-token agreement of an engine with the PyTorch reference over a fixed set of prompts.

Top-1 agreement on held-out text scores each position on the reference's own prefix; a user sees
greedy generation, where one flipped token changes everything after it. Quantized weights, and ONNX
Runtime's int8 activations inside MatMulNBits (accuracy level 4), flip tokens where the two best
logits nearly tie, so `cqil validate` reports, for a quantized export, how many of these prompts
generate the same tokens and how far each goes before the first difference. It is reported, not a
pass condition: a near-tie flip is not a fault of the export.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from cqil.model.steps import Step, greedy_generate

# Fixed on purpose: results over releases stay comparable. Short, varied English prompts (a question,
# code, a list, a continuation of prose, arithmetic, a definition, an instruction, a dialogue).
PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Three uses of a hash table are",
    "It was a bright cold day in April, and the clocks were",
    "Question: What is 12 times 7?\nAnswer:",
    "A photon is",
    "Write a short note to a colleague asking to move our meeting to Friday.",
    "User: Can you recommend a book about the history of science?\nAssistant:",
)
NEW_TOKENS = 16


def prompt_ids(tokenizer, prompts: Sequence[str] = PROMPTS) -> list[torch.Tensor]:
    """Each prompt as token ids [1, n] (no special tokens: the same ids for every side)."""
    return [torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], dtype=torch.long)
            for text in prompts]


def greedy_agreement(reference: Step, engine: Step, prompts: Sequence[torch.Tensor],
                     new_tokens: int = NEW_TOKENS) -> dict[str, Any]:
    """Greedy tokens of both sides per prompt (each on its own cache): identical prompts, and the share of
    tokens generated before the first difference."""
    rows = []
    for ids in prompts:
        mask = torch.ones_like(ids)
        expected = greedy_generate(reference, ids, mask, new_tokens)[0].tolist()
        actual = greedy_generate(engine, ids, mask, new_tokens)[0].tolist()
        same = next((i for i, (a, b) in enumerate(zip(expected, actual)) if a != b), min(len(expected), len(actual)))
        rows.append({"reference": expected, "engine": actual, "same_prefix": same})
    identical = sum(row["reference"] == row["engine"] for row in rows)
    prefix = sum(row["same_prefix"] for row in rows) / (len(rows) * new_tokens) if rows else 1.0
    return {"prompts": len(rows), "new_tokens": new_tokens, "identical": identical,
            "prefix_agreement": round(prefix, 4), "per_prompt": rows}


def describe(result: dict[str, Any]) -> str:
    return (f"greedy tokens on {result['prompts']} fixed prompts x {result['new_tokens']}: {result['identical']} "
            f"identical, {result['prefix_agreement']:.3f} of the tokens before the first difference")
