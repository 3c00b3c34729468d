"""The CUDA-stream runtime, the fused group layout and the decode step against the sequential CqilModel.

On this CPU machine StreamedCqilModel takes its sequential path; the multi-stream path runs only on
CUDA (scripts/gpu_bench.py checks it there against the sequential model before timing).
"""

from __future__ import annotations

import pytest
import torch

from engines.cuda_streams import DecodeStep, StreamedCqilModel
from engines.fused import FusedCqilModel
from pipeline.model.cqil import CqilModel
from pipeline.model.plan import identity_plan, uniform_plan
from tests.conftest import tiny_model


def _inputs(seed: int = 1, batch: int = 2, seq: int = 7):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (batch, seq), generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, :2] = 0  # left padding in the second row
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("size,bypass", [(2, 0), (3, 1), (3, 2)])
def test_streamed_equals_sequential_prefill_and_decode(family, size, bypass):
    hf = tiny_model(family, layers=6)
    plan = uniform_plan(0, 6, size, 6, bypass)
    reference, streamed = CqilModel(hf, plan), StreamedCqilModel(hf, plan)
    ids, mask = _inputs()
    with torch.no_grad():
        want_logits, want_past = reference(ids, mask)
        got_logits, got_past = streamed(ids, mask)
        assert torch.equal(got_logits, want_logits)
        assert all(torch.equal(g, w) for g, w in zip(got_past, want_past))
        step_mask = torch.cat((mask, torch.ones(2, 1, dtype=torch.long)), 1)
        token = want_logits[:, -1].argmax(-1, keepdim=True)
        want, _ = reference(token, step_mask, past_key_values=want_past)
        got, _ = streamed(token, step_mask, past_key_values=got_past)
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("size,bypass", [(2, 0), (2, 1), (4, 2)])
def test_fused_matches_sequential_prefill_and_decode(family, size, bypass):
    hf = tiny_model(family, layers=8)
    plan = uniform_plan(2, 8, size, 8, bypass)
    reference, fused = CqilModel(hf, plan), FusedCqilModel(hf, plan)
    ids, mask = _inputs()
    with torch.no_grad():
        want_logits, want_past = reference(ids, mask)
        got_logits, got_past = fused(ids, mask)
        torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=1e-5)
        for g, w in zip(got_past, want_past):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
        step_mask = torch.cat((mask, torch.ones(2, 1, dtype=torch.long)), 1)
        token = want_logits[:, -1].argmax(-1, keepdim=True)
        want, _ = reference(token, step_mask, past_key_values=want_past)
        got, _ = fused(token, step_mask, past_key_values=got_past)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the CQIL plan really changes the model, so the comparison above is not trivially true
    original, _ = CqilModel(hf, identity_plan(8))(ids, mask)
    assert (original - want_logits).abs().max() > 1e-3


def test_decode_step_runs_the_model_on_its_static_buffers():
    hf = tiny_model("llama", layers=4)
    model = StreamedCqilModel(hf, uniform_plan(0, 4, 2, 4))
    step = DecodeStep(model, past_len=5, device="cpu", dtype=torch.float32)
    logits = step(17).clone()
    with torch.no_grad():
        want, presents = model(torch.tensor([[17]]), torch.ones(1, 6, dtype=torch.long),
                               torch.tensor([[5]]), step.past)
    assert torch.equal(logits, want)
    assert presents[0].shape == (1, 2, 6, 16)
    assert not torch.equal(step(18), logits)
