"""The CQIL model in PyTorch (DESIGN.md section 1): the one model loop, embed -> groups -> norm -> head.

Each group runs `group_step` (model/group.py) with its pieces — the HF modules per layer, or
packed into wide matmuls (`pack`) — under a schedule that decides where and when the pieces run. The
forward is written for torch.export: a flat KV cache, no data-dependent Python control flow.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from cqil.model.decoder import (
    AttentionShape,
    PerLayerPieces,
    StepInputs,
    attention_bias,
    positions_from_mask,
    sliding_window_of,
)
from cqil.model.group import Pieces, Schedule, Sequential, group_step
from cqil.model.kv import KV, flatten, layer_pairs, past_length
from cqil.model.packed import PackedGroup
from cqil.model.plan import Plan
from torch import nn


class CqilModel(nn.Module):
    """A causal LM whose decoder runs by a CQIL plan; the all-singleton plan is the original model.

    `schedule` decides where the pieces of each group run (default: one after another); `packed=True`
    stacks every group of two or more layers into wide matmuls (the single-device fused layout).
    """

    def __init__(self, hf_model: nn.Module, plan: Plan, schedule: Schedule | None = None, packed: bool = False):
        super().__init__()
        config = hf_model.config
        plan.check_fits(config)
        self.hf = hf_model
        self.plan = plan
        self.shape = AttentionShape.of(config)
        self.sliding_window = sliding_window_of(config)
        self.schedule = schedule or Sequential()
        self.packed = nn.ModuleDict({
            str(index): PackedGroup([self.layers[i] for i in group], self.shape)
            for index, group in enumerate(plan.groups) if packed and len(group) > 1
        })

    @property
    def layers(self) -> nn.ModuleList:
        return self.hf.model.layers

    @property
    def num_layers(self) -> int:
        """KV-cache entries: one per layer the plan keeps, in the order they run (dropped layers have none)."""
        return self.plan.num_kept

    @property
    def num_heads(self) -> int:
        return self.shape.heads

    @property
    def num_kv_heads(self) -> int:
        return self.shape.kv_heads

    @property
    def head_dim(self) -> int:
        return self.shape.head_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.hf.model.embed_tokens.weight.dtype

    def with_plan(self, plan: Plan) -> CqilModel:
        """The same weights under another plan (no copy), run one piece after another."""
        return CqilModel(self.hf, plan)

    def with_schedule(self, schedule: Schedule) -> CqilModel:
        """The same weights, plan and pieces (packed or not) under another schedule."""
        model = CqilModel(self.hf, self.plan, schedule)
        model.packed = self.packed
        return model

    def pieces(self, index: int) -> Pieces:
        """The implementation of group `index`: its packed form where there is one, else the HF layers."""
        if str(index) in self.packed:
            return self.packed[str(index)]
        return PerLayerPieces([self.layers[i] for i in self.plan.groups[index]], self.shape)

    # -- the model loop, in parts that calibration (autoplan) reuses --------------------------------

    def prologue(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, StepInputs]:
        """Embeddings and what every layer reads: rotary tables and the causal + window + padding mask."""
        seq = input_ids.shape[1]
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, seq)
        x = self.hf.model.embed_tokens(input_ids)
        rope = self.hf.model.rotary_emb(x, position_ids)
        return x, StepInputs(rope, attention_bias(attention_mask, seq, x.dtype, self.sliding_window))

    def run_group(self, index: int, x: torch.Tensor, step: StepInputs,
                  past: Sequence[KV | None]) -> tuple[torch.Tensor, list[KV | None]]:
        """Group `index` of the plan on stream x; presents per layer of the group (None where not run here)."""
        out, presents = group_step(index, x, self.pieces(index), self.plan.bypass, self.schedule, step, past)
        return out, [presents.get(j) for j in range(len(self.plan.groups[index]))]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf.lm_head(self.hf.model.norm(x))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                past_key_values: Sequence[torch.Tensor | None] | None = None,
                ) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
        """Logits [batch, seq, vocab] and the presents of the kept layers, flat as (k0, v0, k1, v1, ...).

        `past_key_values` is flat in the same order (entry i: the i-th kept layer; dropped layers have none), each [batch, kv_heads, past, head_dim];
        `attention_mask` covers past + new tokens. A schedule that runs only some layers in this process
        leaves None for the others' entries.
        """
        batch, seq = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(batch, past_length(past_key_values) + seq, dtype=torch.long,
                                        device=input_ids.device)
        x, step = self.prologue(input_ids, attention_mask, position_ids)
        past = layer_pairs(past_key_values, self.num_layers)
        presents: list[KV | None] = []
        for index, group in enumerate(self.plan.groups):
            slots = range(len(presents), len(presents) + len(group))  # cache entries of the kept layers
            x, group_presents = self.run_group(index, x, step, [past[i] for i in slots])
            presents += group_presents
        return self.head(x), flatten([kv or (None, None) for kv in presents])

