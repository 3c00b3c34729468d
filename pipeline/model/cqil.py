"""The CQIL model in PyTorch: DESIGN.md section 1, computed over the HF modules of a LLaMA-family LM.

It reads the loaded model's own submodules (norms, q/k/v/o, gate/up/down, embeddings, rotary) at
call time, so peft LoRA layers injected under their standard names take part in the forward. The
forward is written for torch.export: a flat KV cache, no data-dependent Python control flow, and an
explicit causal + padding mask (SDPA's `is_causal` aligns the mask top-left, wrong once there is a past).

For a group G = [g_0..g_{p-1}] reading the residual stream x, with bypass distance d:

    a_j = Attn_j(InNorm_j(x))
    b_j = a_{j-d} + ... + a_{j-1}
    f_j = MLP_j(PostNorm_j(x + a_j + b_j))
    out = x + sum_j (a_j + f_j)

The group step is factored (attention per layer -> bypass -> FFN per layer -> combine) so that a
multi-stream or multi-rank runner can schedule the per-layer pieces itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.errors import CqilError
from pipeline.model.plan import Plan

KV = tuple[torch.Tensor, torch.Tensor]


def positions_from_mask(attention_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Position ids of the last `seq_len` tokens: count of real tokens before each one (left padding safe)."""
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    return positions[:, attention_mask.shape[1] - seq_len:]


def attention_bias(attention_mask: torch.Tensor, seq_len: int, dtype: torch.dtype,
                   sliding_window: int | None = None) -> torch.Tensor:
    """Additive mask [batch, 1, seq, past+seq]: causal (aligned bottom-right) and padding.

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


class CqilModel(nn.Module):
    """A causal LM whose decoder runs by a CQIL plan; the all-singleton plan is the original model."""

    def __init__(self, hf_model: nn.Module, plan: Plan):
        super().__init__()
        config = hf_model.config
        plan.check_fits(config)
        self.hf = hf_model
        self.plan = plan
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.sliding_window = sliding_window_of(config)

    @property
    def layers(self) -> nn.ModuleList:
        return self.hf.model.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def with_plan(self, plan: Plan) -> CqilModel:
        """The same weights under another plan (no copy)."""
        return CqilModel(self.hf, plan)

    # -- per-layer pieces of the group step -------------------------------------------------------

    def layer_attention(self, index: int, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                        bias: torch.Tensor, past: KV | None) -> tuple[torch.Tensor, KV]:
        """a = Attn(InNorm(x)) of layer `index`, and its present key/value."""
        layer = self.layers[index]
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        batch, seq, _ = h.shape
        q = attn.q_proj(h).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, k, *rope)
        if past is not None:
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
        repeat = self.num_heads // self.num_kv_heads
        k_all = k.repeat_interleave(repeat, dim=1) if repeat > 1 else k
        v_all = v.repeat_interleave(repeat, dim=1) if repeat > 1 else v
        out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=bias)
        out = out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
        return attn.o_proj(out), (k, v)

    def bypass(self, attention_outputs: Sequence[torch.Tensor], position: int) -> torch.Tensor | None:
        """b_j: the sum of the up-to-d attention outputs before position j of the group."""
        previous = attention_outputs[max(0, position - self.plan.bypass):position]
        if not previous:
            return None
        total = previous[0]
        for item in previous[1:]:
            total = total + item
        return total

    def layer_ffn(self, index: int, h: torch.Tensor) -> torch.Tensor:
        """f = MLP(PostNorm(h)) of layer `index`."""
        layer = self.layers[index]
        return layer.mlp(layer.post_attention_layernorm(h))

    def group_forward(self, x: torch.Tensor, group: Sequence[int], rope: tuple[torch.Tensor, torch.Tensor],
                      bias: torch.Tensor, past: Sequence[KV | None]) -> tuple[torch.Tensor, list[KV]]:
        """One CQIL group: every layer reads x; out = x + sum_j (a_j + f_j)."""
        attended = [self.layer_attention(i, x, rope, bias, kv) for i, kv in zip(group, past)]
        attention_outputs = [a for a, _ in attended]
        out = x
        for j, index in enumerate(group):
            h = x + attention_outputs[j]
            b = self.bypass(attention_outputs, j)
            if b is not None:
                h = h + b
            # Summed in layer order, so a one-layer group is ((x + a) + f) exactly as in HF.
            out = out + attention_outputs[j] + self.layer_ffn(index, h)
        return out, [kv for _, kv in attended]

    # -- whole model ------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                past_key_values: Sequence[torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Logits [batch, seq, vocab] and the presents, flat as (k0, v0, k1, v1, ...).

        `past_key_values` is flat in the same order, each [batch, kv_heads, past, head_dim];
        `attention_mask` covers past + new tokens.
        """
        batch, seq = input_ids.shape
        past_len = past_key_values[0].shape[2] if past_key_values else 0
        if attention_mask is None:
            attention_mask = torch.ones(batch, past_len + seq, dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, seq)
        x = self.hf.model.embed_tokens(input_ids)
        rope = self.hf.model.rotary_emb(x, position_ids)
        bias = attention_bias(attention_mask, seq, x.dtype, self.sliding_window)
        presents: list[torch.Tensor] = []
        for group in self.plan.groups:
            past = [
                (past_key_values[2 * i], past_key_values[2 * i + 1]) if past_key_values else None
                for i in group
            ]
            x, group_presents = self.group_forward(x, group, rope, bias, past)
            for k, v in group_presents:
                presents.extend((k, v))
        logits = self.hf.lm_head(self.hf.model.norm(x))
        return logits, tuple(presents)


@torch.no_grad()
def greedy_generate(model: Callable[..., tuple[torch.Tensor, tuple[torch.Tensor, ...]]], input_ids: torch.Tensor,
                    attention_mask: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> torch.Tensor:
    """Greedy decoding with the KV cache; returns only the new tokens [batch, <= max_new_tokens].

    `model` is anything called like `CqilModel` (an ONNX Runtime or TensorRT runner, too).
    """
    logits, past = model(input_ids, attention_mask)
    generated = []
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        token = logits[:, -1].argmax(-1)
        if eos_token_id is not None:
            token = token.masked_fill(finished, eos_token_id)
            finished |= token == eos_token_id
        generated.append(token)
        if bool(finished.all()):
            break
        attention_mask = torch.cat((attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)), 1)
        logits, past = model(token[:, None], attention_mask, past_key_values=past)
    return torch.stack(generated, 1)
