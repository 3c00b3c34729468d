"""The exported layouts as schedules of the one group step: ONNX scoping of each piece.

`ScopedSchedule` runs every piece of the group step inside a parameterless scope module named
`g{group}.l{layer}.{role}` (a lane of one layer) or `g{group}.{role}` (a packed lane, the combine).
torch.export records those names in every node's module stack, which `export.naming` turns into ONNX
node names (`/g7/l16/attn/q_proj/MatMul`) and node metadata. The branch layout is the CQIL model with
per-layer pieces under this schedule; the fused layout is the same with packed pieces.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from cqil.export.naming import group_scope, layer_scope
from cqil.model.cqil import CqilModel
from cqil.model.group import fold_terms
from torch import nn

LANE_ROLES = ("attn", "residual", "bypass", "ffn")


class Scope(nn.Module):
    """A parameterless module that runs what it is given: its attribute path names what that computes."""

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)


def _scopes(roles: tuple[str, ...]) -> nn.ModuleDict:
    return nn.ModuleDict({role: Scope() for role in roles})


class ScopedSchedule(nn.Module):
    """The sequential schedule, with each piece inside the named scope of its group, layer and role."""

    def __init__(self, model: CqilModel):
        super().__init__()
        self.plan = model.plan
        for index, group in enumerate(model.plan.groups):
            scopes = _scopes(("combine",))
            for lane in model.pieces(index).lanes:
                if len(lane) == 1:
                    scopes[layer_scope(group[lane[0]])] = _scopes(LANE_ROLES)
                else:
                    scopes.update(_scopes(LANE_ROLES))
            self.add_module(group_scope(index), scopes)

    def _scope(self, group: int, lane: list[int] | None, role: str) -> Scope:
        scopes = getattr(self, group_scope(group))
        if lane is not None and len(lane) == 1:
            scopes = scopes[layer_scope(self.plan.groups[group][lane[0]])]
        return scopes[role]

    def lanes(self, group: int, lanes: list[list[int]]) -> list[list[int]]:
        return lanes

    def call(self, group: int, lane: list[int], role: str, fn: Callable[..., Any], *args: Any,
             reads: tuple[int, ...] = ()) -> Any:
        return self._scope(group, lane, role)(fn, *args)

    def share(self, group: int, attention: dict[int, torch.Tensor], needed: set[int]) -> dict[int, torch.Tensor]:
        return attention

    def combine(self, group: int, x: torch.Tensor, terms: list[tuple[list[torch.Tensor], torch.Tensor]]) -> torch.Tensor:
        return self._scope(group, None, "combine")(fold_terms, x, terms)


def layout_model(model: CqilModel, layout: str) -> CqilModel:
    """The model to trace for `layout`: the same weights, its groups' pieces named by scope."""
    pieces = CqilModel(model.hf, model.plan, packed=layout == "fused")
    return pieces.with_schedule(ScopedSchedule(pieces))
