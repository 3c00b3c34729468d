"""Depth pruning, the baseline users pick instead of CQIL: which K decoder layers to drop.

Two standard selections, both on calibration text only (never the held-out text):

- `block-influence` (ShortGPT): a layer's influence is 1 - mean cos(its input, its output) over every
  token of the original model; the K layers that change the residual stream least are dropped, all at
  once (one original forward).
- `greedy` (SLEB-style): K rounds; each round drops the one further layer whose removal, on top of those
  already dropped, gives the least calibration KL(original || pruned). Each candidate resumes from the
  current pruned model's stream at that layer, so a round costs about half a forward per remaining layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from cqil.model.cqil import CqilModel
from cqil.model.divergence import token_kl
from cqil.model.errors import CqilError
from cqil.model.plan import PRUNE_METHODS, pruned_plan
from cqil.pipeline.autoplan import original_pass, run_from, scored_positions
from tqdm import tqdm

PRUNE_FORMAT = "cqil-prune/1"


@dataclass(frozen=True)
class Pruning:
    """The layers chosen (in the order chosen) and each method's per-step scores for the report."""

    method: str
    dropped: tuple[int, ...]
    scores: dict  # JSON-ready: block influence per layer, or greedy's KL per round and candidate

    def to_dict(self) -> dict:
        return {"format": PRUNE_FORMAT, "method": self.method, "order": list(self.dropped), **self.scores}


def check_count(count: int, num_layers: int) -> None:
    if not 1 <= count < num_layers:
        raise CqilError(f"--prune {count} must be in 1..{num_layers - 1} (this model has {num_layers} layers; "
                        "at least one must stay)")


@torch.no_grad()
def block_influence(original: CqilModel, chunks: torch.Tensor, batch_size: int = 4,
                    progress: bool = True) -> list[float]:
    """ShortGPT's BI per layer: 1 - mean over tokens of cos(layer input, layer output) in the original."""
    if len(chunks) == 0:
        raise CqilError("no calibration chunks: give more text with --data or raise --max-chunks")
    totals = torch.zeros(original.num_layers, dtype=torch.float64)
    tokens = 0
    for batch in tqdm(torch.split(chunks, batch_size), desc="influence", disable=not progress, leave=False):
        hidden, _, _ = original_pass(original, batch, slice(0, 0))
        for layer in range(original.num_layers):
            cos = F.cosine_similarity(hidden[layer].float(), hidden[layer + 1].float(), dim=-1)
            totals[layer] += float(cos.double().sum())
        tokens += batch.numel()
    return [1.0 - float(total) / tokens for total in totals]


@torch.no_grad()
def greedy_kl(original: CqilModel, chunks: torch.Tensor, count: int, batch_size: int = 4, head_every: int = 1,
              progress: bool = True) -> list[dict[int, float]]:
    """K rounds of SLEB-style selection: per round, every remaining layer's calibration KL when dropped too."""
    layers = original.num_layers
    positions = scored_positions(head_every)
    batches = torch.split(chunks, batch_size)
    dropped: list[int] = []
    rounds: list[dict[int, float]] = []
    bar = tqdm(total=count, desc="greedy", unit="round", disable=not progress, leave=False)
    for _ in range(count):
        current = original.with_plan(pruned_plan(dropped, layers)) if dropped else original
        remaining = current.plan.layers
        totals = dict.fromkeys(remaining, 0.0)
        scored = 0
        for batch in batches:
            _, step, reference = original_pass(original, batch, positions)
            scored += reference.shape[0] * reference.shape[1]
            x, _ = original.prologue(batch, torch.ones_like(batch))
            streams = []  # the current pruned model's stream entering each of its groups
            for index in range(len(current.plan.groups)):
                streams.append(x)
                x, _ = current.run_group(index, x, step, [None])
            for index, layer in enumerate(remaining):  # dropping `layer`: group index+1 reads its input
                log_probs = run_from(current, index + 1, streams[index], step, positions)
                totals[layer] += float(token_kl(reference, log_probs).double().sum())
        round_kl = {layer: total / scored for layer, total in totals.items()}
        rounds.append(round_kl)
        dropped.append(min(round_kl, key=lambda layer: (round_kl[layer], layer)))
        bar.update()
    bar.close()
    return rounds


def choose(method: str, original: CqilModel, calibration: torch.Tensor, count: int, batch_size: int = 4,
           head_every: int = 1, progress: bool = True) -> Pruning:
    """The K layers `method` drops from `original`, chosen on `calibration`."""
    check_count(count, original.num_layers)
    if method == "block-influence":
        influence = block_influence(original, calibration, batch_size, progress)
        order = sorted(range(len(influence)), key=lambda layer: (influence[layer], layer))[:count]
        return Pruning(method, tuple(order), {"block_influence": [_short(v) for v in influence]})
    if method == "greedy":
        rounds = greedy_kl(original, calibration, count, batch_size, head_every, progress)
        order = [min(r, key=lambda layer: (r[layer], layer)) for r in rounds]
        table = [{"dropped": layer, "kl": _short(r[layer]),
                  "candidates": {str(k): _short(v) for k, v in r.items()}} for layer, r in zip(order, rounds)]
        return Pruning(method, tuple(order), {"rounds": table, "head_every": head_every})
    raise CqilError(f"--method '{method}' is not one of {', '.join(PRUNE_METHODS)}")


def _short(value: float) -> float:
    return float(f"{value:.6g}") if math.isfinite(value) else value
