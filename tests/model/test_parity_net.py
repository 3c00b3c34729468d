"""Parity tests that a refactor of the CQIL math must not be able to pass by accident.

Two holes in the older tests are closed here:
- Mistral's sliding window (4096 by default) was never crossed, and the ONNX tests compare against the
  same `attention_bias`: here a window of 5 is crossed, against Hugging Face's own eager forward (which
  applies `kv_idx > q_idx - sliding_window` on cache indices, padding included, as we do) in prefill
  with left padding and in decode through HF's own sliding-window cache.
- The fused layouts were checked only on a few (p, d) pairs with norm scales of 1: here every family
  (Qwen2 with q/k/v biases), d = 0, 0 < d < p - 1 and d = p - 1, non-trivial norm scales, left padding,
  a decode step with the cache, logits and every present.

Positions are computed here from the mask on their own (not by `positions_from_mask`), so a broken
position rule in the model shows up against HF and against the cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
from cqil.model.cqil import CqilModel
from cqil.model.plan import Plan, identity_plan, uniform_plan

from tests.helpers import FAMILIES, tiny_model

Step = Callable[..., tuple[torch.Tensor, tuple[torch.Tensor, ...]]]
WINDOW = 5
TOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def fused_models(model: CqilModel) -> dict[str, Step]:
    """Every fused implementation of `model` (same weights, same plan), each called as
    `step(input_ids, attention_mask, position_ids, past) -> (logits, presents)` with a flat past
    (None for prefill). The one place that knows how the fused layouts are built."""
    from cqil.export.contract import ContractModule
    from cqil.export.layouts import layout_model
    from cqil.model.kv import make_cache

    packed = CqilModel(model.hf, model.plan, packed=True).eval()
    layout = ContractModule(layout_model(model, "fused")).eval()

    def run_layout(ids, mask, positions, past=None):
        if past is None:
            past = make_cache(model.num_layers, ids.shape[0], model.num_kv_heads, 0, model.head_dim, torch.float32)
        logits, *presents = layout(ids, mask, positions, *past)
        return logits, tuple(presents)

    return {"CqilModel(packed=True)": lambda ids, mask, positions, past=None: packed(ids, mask, positions, past),
            "fused ONNX layout module": run_layout}


# -- shared inputs ------------------------------------------------------------------------------------

def varied_model(family: str, layers: int, **overrides):
    """A tiny model whose norm scales are not 1, so a scale folded into the wrong weight shows."""
    model = tiny_model(family, layers, **overrides)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(0.6 + 0.8 * torch.rand(param.shape, generator=generator))
    return model


def left_padded(vocab: int, lengths: Sequence[int], seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids [rows, max(lengths)] and a mask with each row's padding on the left (pad id 2)."""
    generator = torch.Generator().manual_seed(seed)
    total = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), total), generator=generator)
    mask = torch.ones_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :total - n] = 0
        ids[row, :total - n] = 2
    return ids, mask


def positions(mask: torch.Tensor, seq: int) -> torch.Tensor:
    """Position of each of the last `seq` tokens: the number of real tokens before it."""
    counts = torch.zeros_like(mask)
    for col in range(1, mask.shape[1]):
        counts[:, col] = counts[:, col - 1] + mask[:, col - 1]
    return counts[:, mask.shape[1] - seq:]


def stepped(step: Step, ids: torch.Tensor, mask: torch.Tensor, prefill: int) -> tuple[torch.Tensor, tuple]:
    """Prefill `prefill` tokens, then the rest one at a time on the step's own cache: all logits, last presents."""
    logits, past = step(ids[:, :prefill], mask[:, :prefill], positions(mask[:, :prefill], prefill), None)
    outputs = [logits]
    for t in range(prefill, ids.shape[1]):
        logits, past = step(ids[:, t:t + 1], mask[:, :t + 1], positions(mask[:, :t + 1], 1), past)
        outputs.append(logits)
    return torch.cat(outputs, 1), past


def cqil_step(model: CqilModel) -> Step:
    return lambda ids, mask, pos, past=None: model(ids, mask, pos, past)


def assert_real_close(actual: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor, tol: float = TOL) -> None:
    """Logits agree at every real (unpadded) position."""
    real = mask.bool()
    assert actual.shape == expected.shape
    error = float((actual[real] - expected[real]).abs().max())
    assert error <= tol, f"max abs error {error:.3g} > {tol}"


def assert_presents_close(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor], mask: torch.Tensor) -> None:
    """Every present agrees at the real key positions (a padding key's value depends on how much of the
    sequence its garbage query row saw, so it differs between prefill lengths by design)."""
    real = mask.bool()
    assert len(actual) == len(expected)
    for index, (got, want) in enumerate(zip(actual, expected)):
        assert got.shape == want.shape, index
        error = float((got - want).abs().amax(dim=(1, 3))[real].max())
        assert error <= TOL, f"present {index // 2}.{'kv'[index % 2]}: max abs error {error:.3g} > {TOL}"


# -- 1. Mistral with a window that the sequence crosses ------------------------------------------------

@pytest.fixture(scope="module")
def mistral():
    model = varied_model("mistral", 4, sliding_window=WINDOW)
    model.set_attn_implementation("eager")
    return model


def hf_stepped(model, ids: torch.Tensor, mask: torch.Tensor, prefill: int) -> torch.Tensor:
    """HF's own forward with its own (sliding-window) cache: prefill, then one token at a time."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    outputs = []
    for start, end in [(0, prefill), *((t, t + 1) for t in range(prefill, ids.shape[1]))]:
        out = model(ids[:, start:end], attention_mask=mask[:, :end], position_ids=positions(mask[:, :end], end - start),
                    cache=cache, use_cache=True)
        outputs.append(out.logits)
    return torch.cat(outputs, 1)


@torch.no_grad()
def test_mistral_window_identity_prefill_matches_hf_eager(mistral):
    ids, mask = left_padded(mistral.config.vocab_size, [20, 13])
    expected = mistral(ids, attention_mask=mask, position_ids=positions(mask, ids.shape[1])).logits
    cqil = CqilModel(mistral, identity_plan(4))
    assert cqil.sliding_window == WINDOW
    logits, presents = cqil(ids, mask)
    assert_real_close(logits, expected, mask)
    assert len(presents) == 8 and presents[0].shape == (2, 2, 20, 16)
    # The window is really crossed: without it the model computes something else.
    cqil.sliding_window = None
    unwindowed, _ = cqil(ids, mask)
    assert float((unwindowed - expected)[mask.bool()].abs().max()) > 1e-3


@torch.no_grad()
def test_mistral_window_identity_decode_matches_hf_and_recompute(mistral):
    ids, mask = left_padded(mistral.config.vocab_size, [22, 15], seed=4)
    cqil = CqilModel(mistral, identity_plan(4))
    expected = hf_stepped(mistral, ids, mask, prefill=6)
    # The CqilModel computes its own positions from the mask (no position_ids passed).
    logits, past = cqil(ids[:, :6], mask[:, :6])
    outputs = [logits]
    for t in range(6, ids.shape[1]):
        logits, past = cqil(ids[:, t:t + 1], mask[:, :t + 1], past_key_values=past)
        outputs.append(logits)
    decoded = torch.cat(outputs, 1)
    assert_real_close(decoded, expected, mask)
    full, presents = cqil(ids, mask)
    assert_real_close(decoded, full, mask)
    assert_presents_close(past, presents, mask)


@torch.no_grad()
@pytest.mark.parametrize("groups,bypass", [(((0, 1), (2, 3)), 1), (((0,), (1, 2, 3)), 1), (((0, 1, 2, 3),), 2)])
def test_mistral_window_cqil_plan_cache_equals_recompute(mistral, groups, bypass):
    ids, mask = left_padded(mistral.config.vocab_size, [18, 11], seed=5)
    cqil = CqilModel(mistral, Plan(groups, bypass))
    decoded, past = stepped(cqil_step(cqil), ids, mask, prefill=3)  # prefill inside the window, decode past it
    full, presents = cqil(ids, mask, positions(mask, ids.shape[1]))
    assert_real_close(decoded, full, mask)
    assert_presents_close(past, presents, mask)
    # Past the window the plan's output depends on it, and the plan differs from the original model.
    cqil.sliding_window = None
    unwindowed, _ = cqil(ids, mask)
    original, _ = CqilModel(mistral, identity_plan(4))(ids, mask)
    real = mask.bool()
    assert float((unwindowed - full)[real].abs().max()) > 1e-3
    assert float((original - full)[real].abs().max()) > 1e-3


# -- 2. the fused layouts equal the sequential CqilModel ---------------------------------------------

LAYERS = 8
SHAPES = [(2, 0), (2, 1), (3, 1), (4, 1), (4, 2), (3, 2)]  # (p, d): d = 0, 0 < d < p - 1, d = p - 1


@pytest.fixture(scope="module")
def family_models():
    made = {}

    def make(family: str):
        if family not in made:
            overrides = {"sliding_window": WINDOW} if family == "mistral" else {}
            made[family] = varied_model(family, LAYERS, **overrides)
        return made[family]

    return make


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size,bypass", SHAPES)
def test_fused_layouts_equal_sequential(family_models, family, size, bypass):
    hf = family_models(family)
    # Groups of `size` from layer 1 (the last may be smaller), singletons around them.
    reference = CqilModel(hf, uniform_plan(1, LAYERS, size, LAYERS, bypass))
    assert any(len(g) == size for g in reference.plan.groups)
    ids, mask = left_padded(hf.config.vocab_size, [9, 5], seed=6)
    prefill = 6  # then 3 decode steps: with Mistral's window of 5 they cross it
    want_logits, want_past = stepped(cqil_step(reference), ids, mask, prefill)
    for name, step in fused_models(reference).items():
        got_logits, got_past = stepped(step, ids, mask, prefill)
        torch.testing.assert_close(got_logits, want_logits, atol=TOL, rtol=TOL,
                                   msg=lambda m, where=f"{name} logits": f"{where}: {m}")
        assert len(got_past) == len(want_past) == 2 * LAYERS
        for index, (got, want) in enumerate(zip(got_past, want_past)):
            where = f"{name} present.{index // 2}.{('key', 'value')[index % 2]}"
            torch.testing.assert_close(got, want, atol=TOL, rtol=TOL, msg=lambda m, where=where: f"{where}: {m}")
    # The plan really changes the model, so equality above is not equality of two original models.
    original, _ = stepped(cqil_step(CqilModel(hf, identity_plan(LAYERS))), ids, mask, prefill)
    assert float((original - want_logits)[mask.bool()].abs().max()) > 1e-3
