"""The fused layout of a CQIL group for one device: the p layers' projections as wide matmuls.

Same math as `CqilModel.group_forward`, fewer and larger kernels:
  - the p input RMSNorms share x's normalisation; each norm weight is folded into its layer's
    q/k/v rows, so all q/k/v of the group are one [p*(q+2kv), hidden] matmul;
  - attention runs once over the p*heads heads (each layer's KV cache stays its own);
  - o_proj, gate/up and down are batched matmuls over the p layers (bmm), post-norm weights folded
    into gate/up; the bypass is a [p, p] 0/1 matrix applied to the stacked attention outputs.
Weights are copied at construction (inference after merge); results equal the sequential model up to
float reassociation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.cqil import KV, CqilModel, apply_rotary
from pipeline.model.errors import CqilError


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS normalisation without the weight, computed in fp32 as the HF norms do."""
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class FusedGroup(nn.Module):
    """One CQIL group of p >= 2 layers with concatenated / batched weights."""

    def __init__(self, model: CqilModel, group: Sequence[int]):
        super().__init__()
        layers = [model.layers[i] for i in group]
        self.p, self.heads, self.kv_heads, self.head_dim = len(group), model.num_heads, model.num_kv_heads, model.head_dim
        attns, mlps = [layer.self_attn for layer in layers], [layer.mlp for layer in layers]
        if any(m.gate_proj.bias is not None or a.o_proj.bias is not None for a, m in zip(attns, mlps)):
            raise CqilError("the fused layout supports q/k/v biases only (no o_proj or MLP bias)")
        self.in_eps = layers[0].input_layernorm.variance_epsilon
        self.post_eps = layers[0].post_attention_layernorm.variance_epsilon
        self.act = mlps[0].act_fn
        self.inter = mlps[0].gate_proj.weight.shape[0]
        with torch.no_grad():
            qkv = [torch.cat((a.q_proj.weight, a.k_proj.weight, a.v_proj.weight)) * layer.input_layernorm.weight
                   for a, layer in zip(attns, layers)]
            self.register_buffer("qkv_weight", torch.cat(qkv).contiguous())
            biases = [(a.q_proj.bias, a.k_proj.bias, a.v_proj.bias) for a in attns]
            has_bias = biases[0][0] is not None
            self.register_buffer("qkv_bias", torch.cat([torch.cat(b) for b in biases]) if has_bias else None)
            self.register_buffer("o_weight", torch.stack([a.o_proj.weight.t() for a in attns]).contiguous())
            gate_up = [torch.cat((m.gate_proj.weight, m.up_proj.weight)) * layer.post_attention_layernorm.weight
                       for m, layer in zip(mlps, layers)]
            self.register_buffer("gate_up_weight", torch.stack([w.t() for w in gate_up]).contiguous())
            self.register_buffer("down_weight", torch.stack([m.down_proj.weight.t() for m in mlps]).contiguous())
        # mix[j, k] = 1 where FFN j reads attention k: itself and the d before it (the bypass).
        index = torch.arange(self.p)
        mix = (index[None, :] <= index[:, None]) & (index[None, :] >= index[:, None] - model.plan.bypass)
        self.register_buffer("mix", mix.to(self.qkv_weight.dtype))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], bias: torch.Tensor,
                past: Sequence[KV | None]) -> tuple[torch.Tensor, list[KV]]:
        batch, seq, hidden = x.shape
        p, heads, kv_heads, head_dim = self.p, self.heads, self.kv_heads, self.head_dim
        qkv = F.linear(_rms(x, self.in_eps), self.qkv_weight, self.qkv_bias)
        qkv = qkv.view(batch, seq, p, heads + 2 * kv_heads, head_dim)
        q = qkv[:, :, :, :heads].reshape(batch, seq, p * heads, head_dim).transpose(1, 2)
        k = qkv[:, :, :, heads:heads + kv_heads].reshape(batch, seq, p * kv_heads, head_dim).transpose(1, 2)
        v = qkv[:, :, :, heads + kv_heads:].reshape(batch, seq, p * kv_heads, head_dim).transpose(1, 2)
        q, k = apply_rotary(q, k, *rope)
        presents = []
        for j, kv in enumerate(past):
            k_j, v_j = k[:, j * kv_heads:(j + 1) * kv_heads], v[:, j * kv_heads:(j + 1) * kv_heads]
            if kv is not None:
                k_j, v_j = torch.cat((kv[0], k_j), dim=2), torch.cat((kv[1], v_j), dim=2)
            presents.append((k_j, v_j))
        k_all = torch.cat([kv[0] for kv in presents], dim=1)
        v_all = torch.cat([kv[1] for kv in presents], dim=1)
        repeat = heads // kv_heads
        if repeat > 1:  # layer-major heads: q head j*heads + h reads kv head j*kv_heads + h // repeat
            k_all, v_all = k_all.repeat_interleave(repeat, dim=1), v_all.repeat_interleave(repeat, dim=1)
        attn = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=bias)
        attn = attn.transpose(1, 2).reshape(batch * seq, p, heads * head_dim).transpose(0, 1)
        a = torch.bmm(attn, self.o_weight)  # [p, tokens, hidden]
        tokens = batch * seq
        h = x.reshape(1, tokens, hidden) + (self.mix @ a.reshape(p, -1)).view(p, tokens, hidden)
        gate, up = torch.bmm(_rms(h, self.post_eps), self.gate_up_weight).split(self.inter, dim=-1)
        f = torch.bmm(self.act(gate) * up, self.down_weight)
        out = x + (a + f).sum(0).view(batch, seq, hidden)
        return out, presents


class FusedCqilModel(CqilModel):
    """CqilModel with every group of two or more layers in the fused layout."""

    def __init__(self, hf_model, plan):
        super().__init__(hf_model, plan)
        self.fused = nn.ModuleDict({str(g[0]): FusedGroup(self, g) for g in plan.groups if len(g) > 1})

    def group_forward(self, x, group, rope, bias, past):
        if len(group) == 1:
            return super().group_forward(x, group, rope, bias, past)
        return self.fused[str(group[0])](x, rope, bias, past)
