"""The one step harness: prefill, then decode with the flat cache, for anything called like `CqilModel`.

A *step* is a callable `(input_ids, attention_mask, position_ids=None, past_key_values=None) ->
(logits, presents)` with the flat cache (k0, v0, k1, v1, ...): `CqilModel` under any schedule, a rank's
share of it, the ONNX Runtime and TensorRT runners, and an HF model behind `HFStep`. Validation,
benchmarks and greedy generation all drive steps through these few functions, so every engine is
prefilled, decoded and timed the same way. It lives in the model ground because generation does,
and every layer above may import it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from cqil.model.decoder import positions_from_mask
from cqil.model.kv import flatten, layer_pairs, past_length
from torch import nn
from transformers import DynamicCache

Output = tuple[torch.Tensor, tuple[Any, ...]]
Step = Callable[..., Output]
NextIds = Callable[[torch.Tensor], torch.Tensor | None]


@torch.no_grad()
def prefill_then_decode(step: Step, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        next_ids: NextIds) -> Iterator[Output]:
    """Yield the prefill's output, then each decode step's, every step chained on the step's own presents.

    `next_ids(logits)` gives the next tokens [batch, 1] from the last output (chosen or forced), or None
    to stop; the attention mask grows by one real token per decode step.
    """
    output = step(input_ids, attention_mask)
    yield output
    while (ids := next_ids(output[0])) is not None:
        attention_mask = torch.cat((attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)), 1)
        output = step(ids, attention_mask, past_key_values=output[1])
        yield output


def forced(tokens: torch.Tensor) -> NextIds:
    """`next_ids` that feeds the columns of `tokens` [batch, n] one at a time, whatever the logits say."""
    columns = iter(tokens.split(1, dim=1))
    return lambda _logits: next(columns, None)


def greedy_generate(step: Step, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                    eos_token_id: int | None = None) -> torch.Tensor:
    """Greedy decoding with the KV cache; returns only the new tokens [batch, <= max_new_tokens].

    A row that produced `eos_token_id` keeps producing it; decoding stops when every row has.
    """
    generated: list[torch.Tensor] = []
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool)

    def next_ids(logits: torch.Tensor) -> torch.Tensor | None:
        nonlocal finished
        token = logits[:, -1].argmax(-1)
        if eos_token_id is not None:
            token = token.masked_fill(finished, eos_token_id)
            finished = finished | (token == eos_token_id)
        generated.append(token)
        if len(generated) == max_new_tokens or bool(finished.all()):
            return None
        return token[:, None]

    for _ in prefill_then_decode(step, input_ids, attention_mask, next_ids):
        pass
    return torch.stack(generated, 1)


def bind(step: Step, input_ids: torch.Tensor, attention_mask: torch.Tensor,
         past_key_values: Sequence[Any] | None = None) -> Callable[[], Output]:
    """One call with its inputs fixed, to be repeated; a step with its own `bind` (an engine runner)
    converts the feed there, once, so a timed call runs only the engine."""
    own = getattr(step, "bind", None)
    if own is not None:
        return own(input_ids, attention_mask, past_key_values=past_key_values)
    return torch.no_grad()(lambda: step(input_ids, attention_mask, past_key_values=past_key_values))


def timing_inputs(step: Step, ids: torch.Tensor, past_len: int) -> dict[str, tuple[Any, ...]]:
    """(input_ids, attention_mask, past) of the prefill and decode calls a benchmark repeats: ids[:, past_len:]
    on an empty cache, and one token (ids[:, :1]) over the presents of a prefill of ids[:, :past_len]."""
    batch = ids.shape[0]

    def ones(length: int) -> torch.Tensor:
        return torch.ones(batch, length, dtype=torch.long, device=ids.device)

    with torch.no_grad():
        _, presents = step(ids[:, :past_len], ones(past_len))
    return {"prefill": (ids[:, past_len:], ones(ids.shape[1] - past_len), None),
            "decode": (ids[:, :1], ones(past_len + 1), presents)}


def timing_calls(step: Step, ids: torch.Tensor, past_len: int) -> tuple[Callable[[], Output], Callable[[], Output]]:
    """The prefill and decode calls of `timing_inputs`, bound; the cache never grows between repeats."""
    inputs = timing_inputs(step, ids, past_len)
    return bind(step, *inputs["prefill"]), bind(step, *inputs["decode"])


class HFStep:
    """A Hugging Face causal LM called as a step: positions from the mask, the flat cache in and out.

    The cache object is rebuilt from the flat past on every call, so the caller's past is never grown in
    place (a benchmark repeats one decode step over the same cache).
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None,
                 past_key_values: Sequence[torch.Tensor] | None = None) -> Output:
        num_layers = self.model.config.num_hidden_layers
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape[0], past_length(past_key_values) + input_ids.shape[1],
                                        dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, input_ids.shape[1])
        pairs = [pair for pair in layer_pairs(past_key_values, num_layers) if pair is not None]
        cache = DynamicCache(pairs or None, config=self.model.config)
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         use_cache=True)
        return out.logits, flatten([(layer.keys, layer.values) for layer in out.cache.layers])
