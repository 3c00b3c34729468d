"""Eval metrics and layer-input similarity against independent computations with HF's own forward."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from cqil.model.cqil import CqilModel
from cqil.model.plan import from_parallel_groups, identity_plan
from cqil.pipeline.analysis import layer_input_similarity, similarity_report
from cqil.pipeline.quality import evaluate

from tests.helpers import tiny_model


def _chunks(vocab, n=5, seq=12):
    return torch.randint(3, vocab, (n, seq), generator=torch.Generator().manual_seed(7))


def test_eval_metrics_match_hf_loss_and_manual_kl():
    model = tiny_model("llama", 6)
    chunks = _chunks(model.config.vocab_size)
    original = CqilModel(model, identity_plan(6))
    cqil = original.with_plan(from_parallel_groups([[1, 2], [3, 4]], 6, 1))
    result = evaluate(original, {"cqil": cqil}, chunks, batch_size=2, progress=False)

    with torch.no_grad():
        hf_loss = model(chunks, labels=chunks).loss  # mean next-token NLL, HF's own shift
        ref = F.log_softmax(model(chunks).logits, -1)
        cand = F.log_softmax(cqil(chunks)[0], -1)
    kl = F.kl_div(cand, ref, log_target=True, reduction="none").sum(-1).mean()
    top1 = (ref.argmax(-1) == cand.argmax(-1)).float().mean()
    assert math.isclose(result["original"]["ppl"], math.exp(float(hf_loss)), rel_tol=1e-4)
    assert math.isclose(result["cqil"]["kl"], float(kl), rel_tol=1e-4)
    assert math.isclose(result["cqil"]["top1"], float(top1), rel_tol=1e-6)
    assert result["cqil"]["kl"] > 0 and result["tokens"] == chunks.numel()


def test_identity_candidate_has_zero_kl_and_full_agreement():
    model = tiny_model("qwen2", 4)
    original = CqilModel(model, identity_plan(4))
    result = evaluate(original, {"same": original.with_plan(identity_plan(4))},
                      _chunks(model.config.vocab_size, 2), progress=False)
    assert abs(result["same"]["kl"]) < 1e-6 and result["same"]["top1"] == 1.0
    assert math.isclose(result["same"]["ppl"], result["original"]["ppl"], rel_tol=1e-6)


def test_similarity_matches_hf_hidden_states():
    model = tiny_model("mistral", 5)
    chunks = _chunks(model.config.vocab_size, 3, 10)
    matrix = layer_input_similarity(CqilModel(model, identity_plan(5)), chunks, batch_size=2, progress=False)
    with torch.no_grad():
        hidden = model(chunks, output_hidden_states=True).hidden_states[:5]  # inputs of layers 0..4
    flat = [F.normalize(h.flatten(0, 1), dim=-1) for h in hidden]
    expected = torch.tensor([[float((a * b).sum(-1).mean()) for b in flat] for a in flat])
    assert torch.allclose(matrix, expected, atol=1e-5)
    assert torch.allclose(matrix.diagonal(), torch.ones(5), atol=1e-5)
    report = similarity_report(matrix, chunks.numel(), "tiny")
    assert report["adjacent"][2] == round(float(matrix[2, 3]), 6) and len(report["all_pairs"]) == 5
