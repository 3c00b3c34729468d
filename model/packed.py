"""The packed implementation of a group's pieces: what the p layers share, computed once or wide.

Every layer of a group reads the same x, so the attention RMSNorm statistics are computed once and each
layer's norm scale is folded (in fp32) into its q/k/v weights: q/k/v of all p layers are one wide
matmul, and attention runs once over p * heads heads, laid out layer-major so grouped-query attention
still pairs each layer's queries with its own keys; each layer's KV cache stays its own. The output
projections run per layer (the bypass needs each a_j), and so does the FFN, on its own input x + a_j + b_j.

Why the FFN is per layer, measured on ONNX Runtime CPU (docs/export.md, "Fused layout on ONNX Runtime"):
a batched gate/up matmul over the p layers has a 3-D weight, which ONNX Runtime does not pre-pack (2-D
weights are), and made prefill 10 % slower than p plain matmuls; a wide down projection over the
concatenated activations was no faster than p plain ones plus their sum. Norms are written as
x / sqrt(mean(x^2) + eps) * scale, the pattern ONNX Runtime fuses into one SimplifiedLayerNormalization
(x * rsqrt(...) is not fused). Weights are copied when the group is packed (inference after merge: LoRA
adapters must be merged first). Results equal the per-layer pieces up to float rounding (the fold, the division).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from cqil.model.decoder import AttentionShape, StepInputs, attend
from cqil.model.errors import CqilError
from cqil.model.kv import KV
from torch import nn

PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def rms_unscaled(x: torch.Tensor, eps: float, ones: torch.Tensor) -> torch.Tensor:
    """RMSNorm whose scale is folded elsewhere, in fp32 as the HF norms do; `ones` keeps ORT's fusion pattern."""
    h = x.to(torch.float32)
    return (h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * ones


def _folded(linear: nn.Linear, scale: torch.Tensor | None) -> torch.Tensor:
    """The [out, in] weight in fp32 with a norm scale folded into its input side."""
    weight = linear.weight.detach().to(torch.float32)
    return weight if scale is None else weight * scale.detach().to(torch.float32)[None, :]


def _copy(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().clone()


class PackedGroup(nn.Module):
    """The pieces of one group of p >= 2 layers: shared norm, wide q/k/v and attention; one lane holds every position."""

    def __init__(self, layers: list[nn.Module], shape: AttentionShape):
        super().__init__()
        if len(layers) < 2:
            raise CqilError("a packed group needs at least two layers")
        if any(isinstance(getattr(layer.self_attn.q_proj, "base_layer", None), nn.Module) for layer in layers):
            raise CqilError("a model with LoRA adapters cannot be packed: merge the adapter first (`cqil merge`)")
        self.p, self.shape = len(layers), shape
        self.lanes = [list(range(self.p))]
        dtype = layers[0].self_attn.q_proj.weight.dtype
        self.attn_eps = layers[0].input_layernorm.variance_epsilon
        self.ffn_eps = layers[0].post_attention_layernorm.variance_epsilon
        self.act = layers[0].mlp.act_fn
        with torch.no_grad():
            self._buffer("ones", torch.ones_like(layers[0].input_layernorm.weight, dtype=dtype))
            # [p * (q + k + v), hidden]: q of every layer, then k of every layer, then v.
            attn = [(layer.self_attn, layer.input_layernorm.weight) for layer in layers]
            qkv = [_folded(getattr(a, name), scale) for name in PROJECTIONS for a, scale in attn]
            self._buffer("qkv_weight", torch.cat(qkv).to(dtype))
            biases = [getattr(a, name).bias for name in PROJECTIONS for a, _ in attn]
            self._buffer("qkv_bias", None if biases[0] is None else torch.cat(biases).detach().to(dtype))
            for j, layer in enumerate(layers):
                mlp, scale = layer.mlp, layer.post_attention_layernorm.weight
                for name, linear, fold in (("o", layer.self_attn.o_proj, None), ("gate", mlp.gate_proj, scale),
                                           ("up", mlp.up_proj, scale), ("down", mlp.down_proj, None)):
                    weight = _copy(linear.weight) if fold is None else _folded(linear, fold).to(dtype)
                    self._buffer(f"{name}_weight_{j}", weight)
                    self._buffer(f"{name}_bias_{j}", _copy(linear.bias))

    def _buffer(self, name: str, tensor: torch.Tensor | None) -> None:
        self.register_buffer(name, tensor, persistent=False)

    def _linear(self, x: torch.Tensor, name: str, j: int) -> torch.Tensor:
        return F.linear(x, getattr(self, f"{name}_weight_{j}"), getattr(self, f"{name}_bias_{j}"))

    def attention(self, lane: list[int], x: torch.Tensor, step: StepInputs,
                  past: list[KV | None]) -> tuple[list[torch.Tensor], list[KV]]:
        batch, seq, _ = x.shape
        p, heads, kv_heads, dim = self.p, self.shape.heads, self.shape.kv_heads, self.shape.head_dim
        qkv = F.linear(rms_unscaled(x, self.attn_eps, self.ones), self.qkv_weight, self.qkv_bias)
        q, k, v = (part.view(batch, seq, -1, dim).transpose(1, 2)
                   for part in qkv.split((p * heads * dim, p * kv_heads * dim, p * kv_heads * dim), dim=-1))
        stacked = None
        if past[0] is not None:
            stacked = (torch.cat([kv[0] for kv in past], dim=1), torch.cat([kv[1] for kv in past], dim=1))
        out, (k, v) = attend(q, k, v, stacked, step)
        out = out.transpose(1, 2).reshape(batch, seq, p, heads * dim)
        outputs = [self._linear(out[:, :, j], "o", j) for j in range(p)]
        return outputs, list(zip(k.split(kv_heads, dim=1), v.split(kv_heads, dim=1)))

    def ffn(self, lane: list[int], inputs: list[torch.Tensor]) -> torch.Tensor:
        """The sum of the p FFN outputs, in layer order."""
        total = None
        for j, x in enumerate(inputs):
            h = rms_unscaled(x, self.ffn_eps, self.ones)
            f = self._linear(self.act(self._linear(h, "gate", j)) * self._linear(h, "up", j), "down", j)
            total = f if total is None else total + f
        return total
