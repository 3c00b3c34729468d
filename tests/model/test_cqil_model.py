"""The CQIL model against HF (all-singleton plan) and against DESIGN.md section 1 written out independently."""

from __future__ import annotations

import pytest
import torch
from cqil.model.cqil import CqilModel
from cqil.model.plan import Plan, from_parallel_groups, identity_plan

from tests.helpers import FAMILIES, tiny_model

LAYERS = 6


def _padded_batch(vocab: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 11), generator=gen)
    mask = torch.ones_like(ids)
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_plan_reproduces_hf_logits(family):
    model = tiny_model(family, LAYERS)
    cqil = CqilModel(model, identity_plan(LAYERS))
    ids, mask = _padded_batch(model.config.vocab_size)
    mask[1, :4] = 0  # left padding
    mask[2, -3:] = 0  # right padding
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        logits, presents = cqil(ids, mask)
    real = mask.bool()
    assert (logits[real] - expected[real]).abs().max() <= 1e-4
    assert len(presents) == 2 * LAYERS
    assert presents[0].shape == (3, model.config.num_key_value_heads, 11, 16)


# -- DESIGN.md section 1, from the raw weights, sharing no code with cqil.model.cqil -----------

def _rms(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope_tables(config, seq):
    head_dim = config.hidden_size // config.num_attention_heads
    theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta") or config.rope_theta
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(seq).float(), inv)
    return torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def _linear(module, x):
    out = x @ module.weight.T
    return out + module.bias if module.bias is not None else out


def _attention(layer, x, config):
    attn = layer.self_attn
    h = _rms(x, layer.input_layernorm.weight, config.rms_norm_eps)
    batch, seq, _ = h.shape
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = config.hidden_size // heads
    q = _linear(attn.q_proj, h).view(batch, seq, heads, dim).transpose(1, 2)
    k = _linear(attn.k_proj, h).view(batch, seq, kv_heads, dim).transpose(1, 2)
    v = _linear(attn.v_proj, h).view(batch, seq, kv_heads, dim).transpose(1, 2)
    cos, sin = _rope_tables(config, seq)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    k = k.repeat_interleave(heads // kv_heads, 1)
    v = v.repeat_interleave(heads // kv_heads, 1)
    scores = q @ k.transpose(-1, -2) / dim**0.5
    scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, heads * dim)
    return _linear(attn.o_proj, out)


def _ffn(layer, h, config):
    mlp = layer.mlp
    z = _rms(h, layer.post_attention_layernorm.weight, config.rms_norm_eps)
    return _linear(mlp.down_proj, torch.nn.functional.silu(_linear(mlp.gate_proj, z)) * _linear(mlp.up_proj, z))


def reference_cqil_logits(model, plan: Plan, ids):
    config, layers = model.config, model.model.layers
    x = model.model.embed_tokens.weight[ids]
    for group in plan.groups:
        a = [_attention(layers[i], x, config) for i in group]
        out = x.clone()
        for j, i in enumerate(group):
            b = sum(a[max(0, j - plan.bypass):j], torch.zeros_like(x))
            out = out + a[j] + _ffn(layers[i], x + a[j] + b, config)
        x = out
    x = _rms(x, model.model.norm.weight, config.rms_norm_eps)
    return x @ model.lm_head.weight.T


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size,bypass", [(p, d) for p in (2, 3, 4) for d in range(p)])
def test_groups_follow_the_design_rule(family, size, bypass):
    model = tiny_model(family, LAYERS)
    plan = from_parallel_groups([list(range(1, 1 + size))], LAYERS, bypass)
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference_cqil_logits(model, plan, ids)
        logits, _ = CqilModel(model, plan)(ids)
        original, _ = CqilModel(model, identity_plan(LAYERS))(ids)
    assert (logits - expected).abs().max() <= 1e-4
    assert (logits - original).abs().max() > 1e-3  # the group really changed the computation


def test_bypass_distance_matters():
    model = tiny_model("llama", LAYERS)
    ids = torch.randint(3, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(3))
    outs = [CqilModel(model, from_parallel_groups([[1, 2, 3]], LAYERS, d))(ids)[0] for d in range(3)]
    assert (outs[0] - outs[1]).abs().max() > 1e-4
    assert (outs[1] - outs[2]).abs().max() > 1e-4


# -- KV cache ---------------------------------------------------------------------------------------

def _cqil(family="llama"):
    model = tiny_model(family, LAYERS)
    return CqilModel(model, from_parallel_groups([[0, 1], [2, 3, 4]], LAYERS, 1))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("left_pad", [0, 3])
def test_decode_with_cache_equals_full_recompute(family, left_pad):
    model = _cqil(family)
    ids, mask = _padded_batch(model.hf.config.vocab_size)
    mask[0, :left_pad] = 0
    with torch.no_grad():
        full, _ = model(ids, mask)
        prefix = 5
        logits, past = model(ids[:, :prefix], mask[:, :prefix])
        steps = [logits]
        for t in range(prefix, ids.shape[1]):
            logits, past = model(ids[:, t:t + 1], mask[:, :t + 1], past_key_values=past)
            steps.append(logits)
    stepped = torch.cat(steps, 1)
    real = mask.bool()
    assert (stepped[real] - full[real]).abs().max() <= 1e-5
    assert past[0].shape[2] == ids.shape[1]


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_unpadded_rows(side):
    model = _cqil()
    ids, _ = _padded_batch(model.hf.config.vocab_size)
    lengths = [11, 7, 4]
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        if side == "left":
            mask[row, ids.shape[1] - n:] = 1
        else:
            mask[row, :n] = 1
    with torch.no_grad():
        batched, _ = model(ids, mask)
        for row, n in enumerate(lengths):
            cols = mask[row].bool()
            alone, _ = model(ids[row:row + 1, cols])
            assert (batched[row, cols] - alone[0]).abs().max() <= 1e-5
