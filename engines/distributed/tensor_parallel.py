"""Tensor parallelism of the same HF model on the same ranks: the baseline CQIL is measured against.

As in gpt-fast's tp.py and Megatron: each rank keeps a slice of the attention heads (q/k/v rows,
o_proj columns) and of the FFN columns (gate/up rows, down_proj columns); o_proj and down_proj are
followed by an all-reduce, two per layer. It is a transform of the loaded HF modules, so the model's
own forward (and its KV cache, now holding this rank's KV heads) runs unchanged.

Heads are split in whole KV groups (GQA), as evenly as the KV-head count allows: SmolLM2's 3 KV
heads on 2 ranks give 6 and 3 query heads. When there are fewer KV heads than ranks, each KV head is
replicated on world / kv_heads ranks, each taking a share of its query heads (as vLLM does). The FFN
columns are split as evenly as possible.
"""

from __future__ import annotations

import torch
from cqil.model.errors import CqilError
from torch import nn


class AllReduceAfter(nn.Module):
    """A row-parallel linear: this rank's partial product summed over the ranks, then the bias (once)."""

    def __init__(self, linear: nn.Linear, group=None):
        super().__init__()
        self.linear = linear
        self.bias = linear.bias
        linear.bias = None
        self.process_group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = self.linear(x)
        dist.all_reduce(out, group=self.process_group)
        return out if self.bias is None else out + self.bias


def head_split(num_heads: int, num_kv_heads: int, world: int) -> list[tuple[range, range]]:
    """Per rank: (query heads, KV heads) it holds; each rank's query heads share its KV heads evenly."""
    groups = num_heads // num_kv_heads
    if num_kv_heads >= world:
        bounds = [round(r * num_kv_heads / world) for r in range(world + 1)]
        kv = [range(bounds[r], bounds[r + 1]) for r in range(world)]
        return [(range(k.start * groups, k.stop * groups), k) for k in kv]
    copies = world // num_kv_heads
    if world % num_kv_heads or groups % copies:
        raise CqilError(f"tensor parallel on {world} ranks cannot split {num_heads} query heads over "
                        f"{num_kv_heads} KV heads evenly: use a rank count that divides or is a multiple "
                        "of the KV-head count")
    share = groups // copies
    return [(range(r * share, (r + 1) * share), range(r // copies, r // copies + 1)) for r in range(world)]


def _even(n: int, world: int, rank: int) -> slice:
    return slice(round(rank * n / world), round((rank + 1) * n / world))


def _rows(linear: nn.Linear, rows: slice) -> nn.Linear:
    out = nn.Linear(linear.in_features, rows.stop - rows.start, bias=linear.bias is not None,
                    dtype=linear.weight.dtype, device=linear.weight.device)
    with torch.no_grad():
        out.weight.copy_(linear.weight[rows])
        if linear.bias is not None:
            out.bias.copy_(linear.bias[rows])
    return out


def _columns(linear: nn.Linear, columns: slice) -> nn.Linear:
    out = nn.Linear(columns.stop - columns.start, linear.out_features, bias=linear.bias is not None,
                    dtype=linear.weight.dtype, device=linear.weight.device)
    with torch.no_grad():
        out.weight.copy_(linear.weight[:, columns])
        if out.bias is not None:
            out.bias.copy_(linear.bias)
    return out


def apply_tensor_parallel(hf_model: nn.Module, rank: int, world: int, group=None) -> nn.Module:
    """Shard every decoder layer of `hf_model` in place for `rank` of `world`; returns it."""
    config = hf_model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads, kv_heads = head_split(config.num_attention_heads, config.num_key_value_heads, world)[rank]
    intermediate = config.intermediate_size
    if intermediate < world:
        raise CqilError(f"the FFN has {intermediate} columns, fewer than {world} ranks")
    q_rows = slice(heads.start * head_dim, heads.stop * head_dim)
    kv_rows = slice(kv_heads.start * head_dim, kv_heads.stop * head_dim)
    ffn = _even(intermediate, world, rank)
    for layer in hf_model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj = _rows(attn.q_proj, q_rows)
        attn.k_proj = _rows(attn.k_proj, kv_rows)
        attn.v_proj = _rows(attn.v_proj, kv_rows)
        attn.o_proj = AllReduceAfter(_columns(attn.o_proj, q_rows), group)
        attn.num_key_value_groups = len(heads) // len(kv_heads)
        mlp.gate_proj = _rows(mlp.gate_proj, ffn)
        mlp.up_proj = _rows(mlp.up_proj, ffn)
        mlp.down_proj = AllReduceAfter(_columns(mlp.down_proj, ffn), group)
    return hf_model
