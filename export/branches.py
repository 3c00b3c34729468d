"""The branch layout: each group of p layers as p branches that read the same group-input tensor.

The per-layer pieces are the reference CqilModel's own (`layer_attention`, `bypass`, `layer_ffn`),
each called inside a parameterless scope module named `g{group}.l{layer}.{role}`. torch.export
records those names in every node's module stack, which `export.naming` turns into ONNX node names
(`/g7/l16/attn/q_proj/MatMul`) and node metadata. Branches meet only where the math says: the bypass
adds of a_{j-d}..a_{j-1} into layer j's FFN input, and the group's combine.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from export.contract import ContractModule
from export.naming import Scope, group_scope, layer_scope
from pipeline.model.cqil import KV, CqilModel


def _residual(x: torch.Tensor, attention_output: torch.Tensor) -> torch.Tensor:
    return x + attention_output


def _combine(x: torch.Tensor, attention_outputs: list[torch.Tensor], ffn_outputs: list[torch.Tensor]) -> torch.Tensor:
    # Summed in layer order, as CqilModel.group_forward does: a one-layer group is ((x + a) + f).
    out = x
    for a, f in zip(attention_outputs, ffn_outputs):
        out = out + a + f
    return out


class BranchLayer(nn.Module):
    """The roles of one layer inside its group; `bypass` is absent where the layer has none."""

    def __init__(self, model: CqilModel, layer: int, position: int):
        super().__init__()
        self.attn = Scope(functools.partial(model.layer_attention, layer))
        self.residual = Scope(_residual)
        if position > 0 and model.plan.bypass > 0:
            self.bypass = Scope(lambda h, outputs: h + model.bypass(outputs, position))
        self.ffn = Scope(functools.partial(model.layer_ffn, layer))


class BranchGroup(nn.Module):
    def __init__(self, model: CqilModel, group: tuple[int, ...]):
        super().__init__()
        self.group = group
        for position, layer in enumerate(group):
            self.add_module(layer_scope(layer), BranchLayer(model, layer, position))
        self.combine = Scope(_combine)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], bias: torch.Tensor,
                past: list[KV]) -> tuple[torch.Tensor, list[KV]]:
        layers = [getattr(self, layer_scope(layer)) for layer in self.group]
        attended = [layer.attn(x, rope, bias, kv) for layer, kv in zip(layers, past)]
        attention_outputs = [a for a, _ in attended]
        ffn_outputs = []
        for layer, a in zip(layers, attention_outputs):
            h = layer.residual(x, a)
            if hasattr(layer, "bypass"):
                h = layer.bypass(h, attention_outputs)
            ffn_outputs.append(layer.ffn(h))
        return self.combine(x, attention_outputs, ffn_outputs), [kv for _, kv in attended]


class BranchLayout(ContractModule):
    """The CQIL model with one explicit branch per layer of every group."""

    def __init__(self, model: CqilModel):
        super().__init__(model)
        for index, group in enumerate(model.plan.groups):
            self.add_module(group_scope(index), BranchGroup(model, group))

    def group_step(self, index, x, rope, bias, past):
        return getattr(self, group_scope(index))(x, rope, bias, past)
