"""The CQIL group step (DESIGN.md section 1), written once, and the protocol of the schedules that run it.

For a group G = [g_0..g_{p-1}] reading the residual stream x, with bypass distance d:

    a_j = Attn_j(InNorm_j(x))
    b_j = a_{j-d} + ... + a_{j-1}
    f_j = MLP_j(PostNorm_j(x + a_j + b_j))
    out = x + sum_j (a_j + f_j)

The step takes its per-layer pieces (attention, FFN) from an implementation — `PerLayerPieces` (the HF
modules) or `PackedGroup` (wide matmuls) — organised in *lanes*, the positions computed together. A
*schedule* decides only where and when each piece runs: one after another (`Sequential`, the reference),
on CUDA streams, inside named ONNX scopes, or one lane per process. It never decides what is computed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from cqil.model.decoder import StepInputs
from cqil.model.kv import KV


class Pieces(Protocol):
    """The per-layer math of one group; `lanes` partitions the positions 0..p-1 into what runs together."""

    lanes: list[list[int]]

    def attention(self, lane: list[int], x: torch.Tensor, step: StepInputs,
                  past: list[KV | None]) -> tuple[list[torch.Tensor], list[KV]]: ...

    def ffn(self, lane: list[int], inputs: list[torch.Tensor]) -> torch.Tensor: ...


class Schedule(Protocol):
    """Where and when the pieces of a group run."""

    def lanes(self, group: int, lanes: list[list[int]]) -> list[list[int]]:
        """The lanes this process runs (all of them, except on a per-rank schedule)."""

    def call(self, group: int, lane: list[int], role: str, fn: Callable[..., Any], *args: Any,
             reads: tuple[int, ...] = ()) -> Any:
        """Run `fn(*args)`, the piece `role` of `lane`; `reads` are the positions outside the lane whose
        attention outputs it reads (the bypass)."""

    def share(self, group: int, attention: dict[int, torch.Tensor], needed: set[int]) -> dict[int, torch.Tensor]:
        """The attention outputs by position, completed with those of `needed` that another process made."""

    def combine(self, group: int, x: torch.Tensor, terms: list[tuple[list[torch.Tensor], torch.Tensor]]) -> torch.Tensor:
        """out = x + sum of every lane's attention outputs and FFN output."""


def bypass_sources(position: int, bypass: int) -> range:
    """Positions whose attention outputs make b_j: j-d .. j-1 within the group."""
    return range(max(0, position - bypass), position)


def fold_terms(x: torch.Tensor, terms: list[tuple[list[torch.Tensor], torch.Tensor]]) -> torch.Tensor:
    """x + a + f lane by lane, in layer order: a one-layer group is ((x + a) + f), exactly as in HF."""
    out = x
    for attention_outputs, ffn_output in terms:
        for a in attention_outputs:
            out = out + a
        out = out + ffn_output
    return out


class Sequential:
    """Every piece in program order on the current device: the reference schedule."""

    def lanes(self, group: int, lanes: list[list[int]]) -> list[list[int]]:
        return lanes

    def call(self, group: int, lane: list[int], role: str, fn: Callable[..., Any], *args: Any,
             reads: tuple[int, ...] = ()) -> Any:
        return fn(*args)

    def share(self, group: int, attention: dict[int, torch.Tensor], needed: set[int]) -> dict[int, torch.Tensor]:
        return attention

    def combine(self, group: int, x: torch.Tensor, terms: list[tuple[list[torch.Tensor], torch.Tensor]]) -> torch.Tensor:
        return fold_terms(x, terms)


def _residuals(x: torch.Tensor, attention_outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [x + a for a in attention_outputs]


def _add_bypass(inputs: list[torch.Tensor], sources: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    out = []
    for h, previous in zip(inputs, sources):
        if previous:
            b = previous[0]
            for a in previous[1:]:
                b = b + a
            h = h + b
        out.append(h)
    return out


def group_step(group: int, x: torch.Tensor, pieces: Pieces, bypass: int, schedule: Schedule, step: StepInputs,
               past: Sequence[KV | None]) -> tuple[torch.Tensor, dict[int, KV]]:
    """One CQIL group: the output stream and the presents of the positions this process ran."""
    lanes = schedule.lanes(group, pieces.lanes)
    attention: dict[int, torch.Tensor] = {}
    presents: dict[int, KV] = {}
    for lane in lanes:
        outputs, kv = schedule.call(group, lane, "attn", pieces.attention, lane, x, step, [past[j] for j in lane])
        attention.update(zip(lane, outputs))
        presents.update(zip(lane, kv))
    local = set(attention)
    needed = {k for j in local for k in bypass_sources(j, bypass)} - local
    attention = schedule.share(group, attention, needed)
    terms = []
    for lane in lanes:
        own = [attention[j] for j in lane]
        inputs = schedule.call(group, lane, "residual", _residuals, x, own)
        sources = [[attention[k] for k in bypass_sources(j, bypass)] for j in lane]
        if any(sources):
            reads = tuple(sorted({k for j in lane for k in bypass_sources(j, bypass)} - set(lane)))
            inputs = schedule.call(group, lane, "bypass", _add_bypass, inputs, sources, reads=reads)
        terms.append((own, schedule.call(group, lane, "ffn", pieces.ffn, lane, inputs)))
    return schedule.combine(group, x, terms), presents
