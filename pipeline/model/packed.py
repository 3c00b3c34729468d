"""The packed implementation of a group's pieces: the p layers' projections stacked into wide matmuls.

For a device that runs one kernel at a time, p narrow matmuls cost more than one wide one (PaLM's parallel
layers, FFN Fusion). Every layer of a group reads the same x, so:
- the attention RMSNorm statistics are computed once and each layer's norm scale is folded (in fp32) into
  its q/k/v weights: q/k/v of all p layers are one matmul;
- attention runs once over p * heads heads, laid out layer-major so grouped-query attention still pairs
  each layer's queries with its own keys; each layer's KV cache stays its own;
- the output projections run per layer (the bypass needs each a_j);
- gate/up are one batched matmul over the p layers (post-norm scales folded), and the down projections one
  wide matmul over the concatenated activations, which sums the p FFN outputs as it goes.
Weights are copied when the group is packed (inference after merge: LoRA adapters must be merged first).
Results equal the per-layer pieces up to float rounding (the fold and the summation order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.decoder import AttentionShape, StepInputs, attend
from pipeline.model.errors import CqilError
from pipeline.model.kv import KV


def rms_unscaled(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without its scale, computed in fp32 as the HF norms do."""
    h = x.to(torch.float32)
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _folded(linear: nn.Linear, scale: torch.Tensor | None) -> torch.Tensor:
    """The [out, in] weight in fp32 with a norm scale folded into its input side."""
    weight = linear.weight.detach().to(torch.float32)
    return weight if scale is None else weight * scale.detach().to(torch.float32)[None, :]


def _bias(linears: list[nn.Linear]) -> torch.Tensor | None:
    if linears[0].bias is None:
        return None
    return torch.cat([linear.bias.detach().to(torch.float32) for linear in linears])


class PackedGroup(nn.Module):
    """The pieces of one group of p >= 2 layers as wide operations; one lane holds every position."""

    def __init__(self, layers: list[nn.Module], shape: AttentionShape):
        super().__init__()
        if len(layers) < 2:
            raise CqilError("a packed group needs at least two layers")
        if any(isinstance(getattr(layer.self_attn.q_proj, "base_layer", None), nn.Module) for layer in layers):
            raise CqilError("a model with LoRA adapters cannot be packed: merge the adapter first (`cqil merge`)")
        self.p, self.shape = len(layers), shape
        self.lanes = [list(range(self.p))]
        dtype = layers[0].self_attn.q_proj.weight.dtype
        attn = [layer.self_attn for layer in layers]
        mlp = [layer.mlp for layer in layers]
        self.attn_eps = layers[0].input_layernorm.variance_epsilon
        self.ffn_eps = layers[0].post_attention_layernorm.variance_epsilon
        self.act = mlp[0].act_fn
        self.ffn_width = mlp[0].gate_proj.weight.shape[0]
        in_scales = [layer.input_layernorm.weight for layer in layers]
        post_scales = [layer.post_attention_layernorm.weight for layer in layers]
        with torch.no_grad():
            # [p*(q + k + v), hidden]: q of every layer, then k of every layer, then v.
            qkv = [_folded(getattr(a, name), s) for name in ("q_proj", "k_proj", "v_proj") for a, s in zip(attn, in_scales)]
            qkv_bias = [_bias([getattr(a, name) for a in attn]) for name in ("q_proj", "k_proj", "v_proj")]
            self._buffer("qkv_weight", torch.cat(qkv).to(dtype))
            self._buffer("qkv_bias", None if qkv_bias[0] is None else torch.cat(qkv_bias).to(dtype))
            for j, a in enumerate(attn):
                self._buffer(f"o_weight_{j}", a.o_proj.weight.detach().clone())
                self._buffer(f"o_bias_{j}", None if a.o_proj.bias is None else a.o_proj.bias.detach().clone())
            # [p, hidden, 2 * ffn]: gate then up of each layer, for one batched matmul.
            gate_up = [torch.cat((_folded(m.gate_proj, s), _folded(m.up_proj, s))).t() for m, s in zip(mlp, post_scales)]
            self._buffer("gate_up_weight", torch.stack(gate_up).to(dtype).contiguous())
            biases = [_bias([m.gate_proj, m.up_proj]) for m in mlp]
            self._buffer("gate_up_bias", None if biases[0] is None else torch.stack(biases)[:, None, :].to(dtype))
            # [hidden, p * ffn]: sum_j down_j(g_j) = down_cat @ concat_j(g_j).
            self._buffer("down_weight", torch.cat([m.down_proj.weight.detach() for m in mlp], dim=1).contiguous())
            down_bias = _bias([m.down_proj for m in mlp])
            self._buffer("down_bias", None if down_bias is None else down_bias.view(self.p, -1).sum(0).to(dtype))

    def _buffer(self, name: str, tensor: torch.Tensor | None) -> None:
        self.register_buffer(name, tensor, persistent=False)

    def attention(self, lane: list[int], x: torch.Tensor, step: StepInputs,
                  past: list[KV | None]) -> tuple[list[torch.Tensor], list[KV]]:
        batch, seq, _ = x.shape
        p, heads, kv_heads, dim = self.p, self.shape.heads, self.shape.kv_heads, self.shape.head_dim
        qkv = F.linear(rms_unscaled(x, self.attn_eps), self.qkv_weight, self.qkv_bias)
        q, k, v = qkv.split((p * heads * dim, p * kv_heads * dim, p * kv_heads * dim), dim=-1)
        q = q.view(batch, seq, p * heads, dim).transpose(1, 2)
        k = k.view(batch, seq, p * kv_heads, dim).transpose(1, 2)
        v = v.view(batch, seq, p * kv_heads, dim).transpose(1, 2)
        stacked = None
        if past[0] is not None:
            stacked = (torch.cat([kv[0] for kv in past], dim=1), torch.cat([kv[1] for kv in past], dim=1))
        out, (k, v) = attend(q, k, v, stacked, step)
        out = out.transpose(1, 2).reshape(batch, seq, p, heads * dim)
        outputs = [F.linear(out[:, :, j], getattr(self, f"o_weight_{j}"), getattr(self, f"o_bias_{j}"))
                   for j in range(p)]
        presents = list(zip(k.split(kv_heads, dim=1), v.split(kv_heads, dim=1)))
        return outputs, presents

    def ffn(self, lane: list[int], inputs: list[torch.Tensor]) -> torch.Tensor:
        """The sum of the p FFN outputs."""
        batch, seq, hidden = inputs[0].shape
        h = rms_unscaled(torch.stack(inputs), self.ffn_eps).view(self.p, batch * seq, hidden)
        gate_up = torch.bmm(h, self.gate_up_weight)
        if self.gate_up_bias is not None:
            gate_up = gate_up + self.gate_up_bias
        gate, up = gate_up.split(self.ffn_width, dim=-1)
        activations = (self.act(gate) * up).transpose(0, 1).reshape(batch, seq, self.p * self.ffn_width)
        return F.linear(activations, self.down_weight, self.down_bias)
