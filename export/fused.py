"""The fused layout: the same CQIL math with each group's p layers packed into wide operations.

For one device that runs one kernel at a time, p narrow matmuls cost more than one wide one. Per group:
- the attention RMSNorm statistics are computed once (every layer of a group reads the same x) and
  each layer's norm scale is folded into its q/k/v weights, so q/k/v of all p layers are one matmul;
- attention runs once over p * heads heads (GQA keeps working: the heads are laid out layer-major);
- the output projections, gate/up and down projections are one batched matmul each over the p layers;
- the bypass sums are one small matmul with a 0/1 band matrix; the combine is one sum over p.
The KV cache stays per layer, as the contract says; it is concatenated on the head axis inside.
Folding the norm scales into the weights changes rounding only (equal to the branch layout within
float error, which the tests check).
"""

from __future__ import annotations

import torch
from torch import nn

from export.contract import ContractModule
from export.naming import Scope, group_scope
from pipeline.model.cqil import KV, CqilModel, apply_rotary


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without its scale, computed in fp32 as the HF modules do."""
    x32 = x.to(torch.float32)
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _stack_linear(linears: list[nn.Linear], scales: list[torch.Tensor] | None, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[p, in, out] weights (norm scale folded into the input side, in fp32) and [p, 1, out] biases."""
    weights = []
    for j, linear in enumerate(linears):
        w = linear.weight.detach().to(torch.float32)
        if scales is not None:
            w = w * scales[j].detach().to(torch.float32)[None, :]
        weights.append(w.t())
    bias = None
    if linears[0].bias is not None:
        bias = torch.stack([lin.bias.detach() for lin in linears])[:, None, :].to(dtype)
    return torch.stack(weights).to(dtype).contiguous(), bias


class FusedGroup(nn.Module):
    """One group of p layers as wide operations; buffers hold the packed weights."""

    def __init__(self, model: CqilModel, group: tuple[int, ...], dtype: torch.dtype):
        super().__init__()
        layers = [model.layers[i] for i in group]
        self.p = len(group)
        self.heads, self.kv_heads, self.head_dim = model.num_heads, model.num_kv_heads, model.head_dim
        self.attn_eps = layers[0].input_layernorm.variance_epsilon
        self.ffn_eps = layers[0].post_attention_layernorm.variance_epsilon
        self.act = layers[0].mlp.act_fn
        attn_scales = [layer.input_layernorm.weight for layer in layers]
        ffn_scales = [layer.post_attention_layernorm.weight for layer in layers]
        # q/k/v of all layers side by side: [hidden, p*(q + k + v)], ordered q of every layer, then k, then v.
        parts = []
        for name in ("q_proj", "k_proj", "v_proj"):
            parts.append(_stack_linear([getattr(layer.self_attn, name) for layer in layers], attn_scales, dtype))
        self._register("qkv_weight", torch.cat([torch.cat(list(w), dim=1) for w, _ in parts], dim=1))
        self._register("qkv_bias", None if parts[0][1] is None else
                       torch.cat([torch.cat(list(b[:, 0]), dim=0) for _, b in parts], dim=0))
        o_weight, o_bias = _stack_linear([layer.self_attn.o_proj for layer in layers], None, dtype)
        self._register("o_weight", o_weight)
        self._register("o_bias", o_bias)
        gate, gate_bias = _stack_linear([layer.mlp.gate_proj for layer in layers], ffn_scales, dtype)
        up, up_bias = _stack_linear([layer.mlp.up_proj for layer in layers], ffn_scales, dtype)
        self._register("gate_up_weight", torch.cat((gate, up), dim=2))
        self._register("gate_up_bias", None if gate_bias is None else torch.cat((gate_bias, up_bias), dim=2))
        down, down_bias = _stack_linear([layer.mlp.down_proj for layer in layers], None, dtype)
        self._register("down_weight", down)
        self._register("down_bias", down_bias)
        # b_j = a_{j-d} + ... + a_{j-1}: row j of the band matrix picks those attention outputs.
        d = model.plan.bypass
        band = torch.zeros(self.p, self.p, dtype=dtype)
        for j in range(self.p):
            band[j, max(0, j - d):j] = 1
        self._register("bypass_band", band if d > 0 and self.p > 1 else None)

        self.attn_norm = Scope(lambda x: _rms(x, self.attn_eps))
        self.attn = Scope(self._attention)
        self.residual = Scope(lambda x, a: x[None] + a)
        if self.bypass_band is not None:
            self.bypass = Scope(lambda h, a: h + (self.bypass_band @ a.flatten(1)).view_as(a))
        self.ffn_norm = Scope(lambda h: _rms(h, self.ffn_eps))
        self.ffn = Scope(self._ffn)
        self.combine = Scope(lambda x, a, f: x + (a + f).sum(0).view_as(x))

    def _register(self, name: str, tensor: torch.Tensor | None) -> None:
        self.register_buffer(name, tensor, persistent=False)

    def _attention(self, n: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], bias: torch.Tensor,
                   past: list[KV]) -> tuple[torch.Tensor, list[KV]]:
        """a: [p, batch*seq, hidden] for normalized input n [batch, seq, hidden]; presents per layer."""
        batch, seq, _ = n.shape
        p, heads, kv_heads, dim = self.p, self.heads, self.kv_heads, self.head_dim
        qkv = n @ self.qkv_weight
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias
        q, k, v = qkv.split((p * heads * dim, p * kv_heads * dim, p * kv_heads * dim), dim=-1)
        q = q.view(batch, seq, p * heads, dim).transpose(1, 2)
        k = k.view(batch, seq, p * kv_heads, dim).transpose(1, 2)
        v = v.view(batch, seq, p * kv_heads, dim).transpose(1, 2)
        q, k = apply_rotary(q, k, *rope)
        k = torch.cat((torch.cat([kv[0] for kv in past], dim=1), k), dim=2)
        v = torch.cat((torch.cat([kv[1] for kv in past], dim=1), v), dim=2)
        repeat = heads // kv_heads
        k_all = k.repeat_interleave(repeat, dim=1) if repeat > 1 else k
        v_all = v.repeat_interleave(repeat, dim=1) if repeat > 1 else v
        out = torch.nn.functional.scaled_dot_product_attention(q, k_all, v_all, attn_mask=bias)
        # [batch, p*heads, seq, dim] -> [p, batch*seq, heads*dim] for one batched output projection.
        out = out.view(batch, p, heads, seq, dim).permute(1, 0, 3, 2, 4).reshape(p, batch * seq, heads * dim)
        a = torch.bmm(out, self.o_weight)
        if self.o_bias is not None:
            a = a + self.o_bias
        presents = list(zip(k.split(kv_heads, dim=1), v.split(kv_heads, dim=1)))
        return a, presents

    def _ffn(self, n: torch.Tensor) -> torch.Tensor:
        gate_up = torch.bmm(n, self.gate_up_weight)
        if self.gate_up_bias is not None:
            gate_up = gate_up + self.gate_up_bias
        gate, up = gate_up.chunk(2, dim=-1)
        f = torch.bmm(self.act(gate) * up, self.down_weight)
        return f if self.down_bias is None else f + self.down_bias

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], bias: torch.Tensor,
                past: list[KV]) -> tuple[torch.Tensor, list[KV]]:
        batch, seq, hidden = x.shape
        a, presents = self.attn(self.attn_norm(x), rope, bias, past)
        h = self.residual(x.reshape(batch * seq, hidden), a)
        if hasattr(self, "bypass"):
            h = self.bypass(h, a)
        f = self.ffn(self.ffn_norm(h))
        return self.combine(x, a, f), presents


class FusedLayout(ContractModule):
    """The CQIL model with every group packed into wide operations (`--layout fused`)."""

    def __init__(self, model: CqilModel):
        super().__init__(model)
        dtype = model.hf.model.embed_tokens.weight.dtype
        for index, group in enumerate(model.plan.groups):
            self.add_module(group_scope(index), FusedGroup(model, group, dtype))

    def group_step(self, index, x, rope, bias, past):
        return getattr(self, group_scope(index))(x, rope, bias, past)
