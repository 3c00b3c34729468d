"""`validate_onnx` on a left-padded batch of two prompts of different lengths, on the shared tiny export.

Prefill then decode, ONNX Runtime and PyTorch each on their own cache. It passes as exported, and it
fails when the ORT side is fed a wrong mask: in every call (prefill fails), or only in the decode
steps (prefill passes, decode fails) — so the padded path really reaches both phases of both sides.
"""

from __future__ import annotations

import pytest
import torch
from cqil.engines.onnxruntime import OrtRunner
from cqil.engines.validate import validate_onnx
from cqil.model.cqil import CqilModel
from cqil.model.errors import CqilError
from cqil.model.plan import Plan

PLAN = Plan(((0,), (1, 2, 3)), 1)  # the plan of the `tiny_cqil_onnx` export
DECODE = 4
LENGTHS = (9, 16)  # real tokens per row; the shorter row is left-padded to 16
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def reference(tiny_cqil_onnx):
    from transformers import AutoModelForCausalLM

    return CqilModel(AutoModelForCausalLM.from_pretrained(tiny_cqil_onnx[0]).eval(), PLAN)


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    total = max(LENGTHS)
    chunks = torch.randint(3, 384, (len(LENGTHS), total), generator=torch.Generator().manual_seed(11))
    mask = torch.ones_like(chunks)
    for row, n in enumerate(LENGTHS):
        chunks[row, :total - n] = 2
        mask[row, :total - n] = 0
    return chunks, mask


def feed_ort(monkeypatch, change=None) -> list[tuple[torch.Tensor, bool]]:
    """Record (mask, has past) of every ORT call; `change(mask, has_past)` may replace the mask it gets."""
    calls = []
    original = OrtRunner.__call__

    def call(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None):
        has_past = bool(past_key_values)
        calls.append((attention_mask.clone(), has_past))
        if change is not None:
            attention_mask = change(attention_mask, has_past)
        return original(self, input_ids, attention_mask, position_ids, past_key_values)

    monkeypatch.setattr(OrtRunner, "__call__", call)
    return calls


def run(onnx_dir, reference, chunks, mask):
    return validate_onnx(onnx_dir, reference, chunks, decode_steps=DECODE, threads=1, progress=False,
                         attention_mask=mask)


def test_left_padded_batch_passes_through_prefill_and_decode(tiny_cqil_onnx, reference, monkeypatch):
    chunks, mask = padded_batch()
    calls = feed_ort(monkeypatch)
    result = run(tiny_cqil_onnx[1], reference, chunks, mask)
    assert result["passed"], result["engines"]["onnxruntime"]
    ort = result["engines"]["onnxruntime"]
    assert ort["prefill"]["positions"] == 2 * (16 - DECODE) and ort["decode"]["positions"] == 2 * DECODE
    assert ort["prefill"]["logits"]["max_abs"] < 1e-4 and ort["decode"]["logits"]["max_abs"] < 1e-4
    # ORT saw the padding in the prefill and in every decode step, each step on a longer cache.
    assert [(m.shape[1], has_past) for m, has_past in calls] == [(12, False), (13, True), (14, True), (15, True),
                                                               (16, True)]
    assert all(torch.equal(m, mask[:, :m.shape[1]]) for m, _ in calls)


def test_ort_ignoring_the_padding_fails(tiny_cqil_onnx, reference, monkeypatch):
    chunks, mask = padded_batch()
    feed_ort(monkeypatch, lambda m, has_past: torch.ones_like(m))
    result = run(tiny_cqil_onnx[1], reference, chunks, mask)
    assert not result["passed"]
    assert not result["engines"]["onnxruntime"]["prefill"]["logits"]["passed"]
    assert result["engines"]["onnxruntime"]["prefill"]["logits"]["max_abs"] > 1e-2


def test_wrong_mask_in_decode_only_fails_decode(tiny_cqil_onnx, reference, monkeypatch):
    chunks, mask = padded_batch()
    feed_ort(monkeypatch, lambda m, has_past: torch.ones_like(m) if has_past else m)
    result = run(tiny_cqil_onnx[1], reference, chunks, mask)
    ort = result["engines"]["onnxruntime"]
    assert ort["prefill"]["passed"] and not ort["decode"]["passed"] and not result["passed"]
    assert not ort["decode"]["logits"]["passed"]


def test_mask_must_fit_the_chunks(tiny_cqil_onnx, reference):
    chunks, mask = padded_batch()
    with pytest.raises(CqilError, match="chunks' shape"):
        run(tiny_cqil_onnx[1], reference, chunks, mask[:, 1:])
    mask[0, -1] = 0
    with pytest.raises(CqilError, match="decoded tokens"):
        run(tiny_cqil_onnx[1], reference, chunks, mask)


def test_decode_runs_on_the_engines_own_cache(tiny_cqil_onnx, reference, monkeypatch):
    """An engine whose cache is wrong fails decode: it is fed its own presents, never the reference's."""
    from cqil.engines.runner import ContractRunner

    original = ContractRunner.__call__
    monkeypatch.setattr(ContractRunner, "__call__", lambda self, *args, **kwargs: (
        lambda out: (out[0], tuple(present * 0.5 for present in out[1])))(original(self, *args, **kwargs)))
    chunks, mask = padded_batch()
    ort = run(tiny_cqil_onnx[1], reference, chunks, mask)["engines"]["onnxruntime"]
    assert ort["prefill"]["logits"]["passed"] and not ort["decode"]["logits"]["passed"]
