"""The decoder-layer math of a LLaMA-family model, once: positions, mask, rotary, one layer's attention and FFN.

Written for torch.export: no data-dependent Python control flow, an explicit causal + padding mask
(SDPA's `is_causal` aligns the mask top-left, wrong once there is a past). The per-layer pieces read the
loaded model's own submodules (norms, q/k/v/o, gate/up/down) at call time, so peft LoRA layers injected
under their standard names take part.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from cqil.model.errors import CqilError
from cqil.model.kv import KV
from torch import nn


@dataclass(frozen=True)
class AttentionShape:
    """Head geometry shared by every layer of the model."""

    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> AttentionShape:
        heads = config.num_attention_heads
        return cls(heads, config.num_key_value_heads, getattr(config, "head_dim", None) or config.hidden_size // heads)


@dataclass(frozen=True)
class StepInputs:
    """What every layer of one forward step reads besides the residual stream: rotary tables and the mask."""

    rope: tuple[torch.Tensor, torch.Tensor]
    bias: torch.Tensor


def positions_from_mask(attention_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Position ids of the last `seq_len` tokens: count of real tokens before each one (left padding safe)."""
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    return positions[:, attention_mask.shape[1] - seq_len:]


def attention_bias(attention_mask: torch.Tensor, seq_len: int, dtype: torch.dtype,
                   sliding_window: int | None = None) -> torch.Tensor:
    """Additive mask [batch, 1, seq, past+seq]: causal (aligned bottom-right), sliding window and padding.

    Masked entries get the dtype's minimum rather than -inf, so a row with nothing to attend to
    (a left-padding query) yields finite garbage instead of NaN.
    """
    total = attention_mask.shape[1]
    query_index = torch.arange(seq_len, device=attention_mask.device) + (total - seq_len)
    key_index = torch.arange(total, device=attention_mask.device)
    allowed = key_index[None, :] <= query_index[:, None]
    if sliding_window is not None:
        allowed = allowed & (key_index[None, :] > query_index[:, None] - sliding_window)
    allowed = allowed[None, None, :, :] & attention_mask[:, None, None, :].bool()
    zeros = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device)
    return zeros.masked_fill(~allowed, torch.finfo(dtype).min)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def sliding_window_of(config) -> int | None:
    """Mistral's attention window, if its config sets one; Qwen2's windowed variant is refused."""
    if config.model_type == "qwen2" and getattr(config, "use_sliding_window", False):
        raise CqilError("Qwen2 checkpoints with use_sliding_window=true are not supported")
    if config.model_type == "mistral":
        return getattr(config, "sliding_window", None)
    return None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: KV | None, step: StepInputs) -> tuple[torch.Tensor, KV]:
    """Rotary, cache append and masked attention of projected q [b, H, s, d], k/v [b, KV, s, d].

    Heads are grouped: query head h reads kv head h // (H / KV). The queries are regrouped instead
    of the keys and values repeated: q is viewed as [b, KV, rep * s, d] (head h = kv * rep + r), so
    each product reads the KV cache once, and the graph carries no repeated or transposed copy of it
    per query head. With several layers packed on the head axis (layer-major), the same rule keeps
    each layer's queries on its own keys.
    """
    q, k = apply_rotary(q, k, *step.rope)
    if past is not None:
        k = torch.cat((past[0], k), dim=2)
        v = torch.cat((past[1], v), dim=2)
    batch, heads, seq, dim = q.shape
    kv_heads, total = k.shape[1], k.shape[2]
    repeat = heads // kv_heads
    # Shapes name only the inputs' own sizes and -1 (views, so the -1 stays in the graph): a product
    # of sizes would be computed once, in the first layer's scope, and read by every later group.
    grouped = (q * dim ** -0.5).contiguous().view(batch, kv_heads, -1, dim)
    scores = torch.matmul(grouped, k.transpose(2, 3)).reshape(batch, kv_heads, repeat, seq, -1)
    weights = (scores + step.bias.unsqueeze(1)).softmax(dim=-1).reshape(batch, kv_heads, -1, total)
    return torch.matmul(weights, v).reshape(batch, heads, -1, dim), (k, v)


def layer_attention(layer: nn.Module, shape: AttentionShape, x: torch.Tensor, step: StepInputs,
                    past: KV | None) -> tuple[torch.Tensor, KV]:
    """a = Attn(InNorm(x)) of one HF decoder layer, and its present key/value."""
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    batch, seq, _ = h.shape
    q = attn.q_proj(h).view(batch, seq, shape.heads, shape.head_dim).transpose(1, 2)
    k = attn.k_proj(h).view(batch, seq, shape.kv_heads, shape.head_dim).transpose(1, 2)
    v = attn.v_proj(h).view(batch, seq, shape.kv_heads, shape.head_dim).transpose(1, 2)
    out, present = attend(q, k, v, past, step)
    out = out.transpose(1, 2).reshape(batch, seq, shape.heads * shape.head_dim)
    return attn.o_proj(out), present


def layer_ffn(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """f = MLP(PostNorm(h)) of one HF decoder layer."""
    return layer.mlp(layer.post_attention_layernorm(h))


class PerLayerPieces:
    """The pieces of a group taken from the HF modules, one lane per layer (peft LoRA layers take part)."""

    def __init__(self, layers: list[nn.Module], shape: AttentionShape):
        self.layers = layers
        self.shape = shape
        self.lanes = [[j] for j in range(len(layers))]

    def attention(self, lane: list[int], x: torch.Tensor, step: StepInputs,
                  past: list[KV | None]) -> tuple[list[torch.Tensor], list[KV]]:
        results = [layer_attention(self.layers[j], self.shape, x, step, kv) for j, kv in zip(lane, past)]
        return [a for a, _ in results], [kv for _, kv in results]

    def ffn(self, lane: list[int], inputs: list[torch.Tensor]) -> torch.Tensor:
        """The sum of the lane's FFN outputs (in layer order)."""
        total = layer_ffn(self.layers[lane[0]], inputs[0])
        for j, h in zip(lane[1:], inputs[1:]):
            total = total + layer_ffn(self.layers[j], h)
        return total
