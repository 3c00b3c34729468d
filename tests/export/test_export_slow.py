"""The default model (SmolLM2-135M) exported as the paper-style S15:30:2 d=1 CQIL model, run by ORT."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cqil.export.check import check_branch_structure
from cqil.model.cqil import CqilModel
from cqil.model.plan import uniform_plan
from cqil.pipeline.cli import main
from cqil.pipeline.data import load_split
from cqil.pipeline.sources import load_model

from tests.ort_runner import run, session

SEQ_LEN, CHUNKS, DECODE_STEPS = 128, 2, 8


@pytest.mark.slow
def test_default_model_s15_30_2_d1_matches_pytorch_on_held_out_text(tmp_path):
    out = tmp_path / "onnx"
    assert main(["export", "--uniform", "15:30:2", "--bypass", "1", "--out", str(out)]) == 0
    assert check_branch_structure(out / "model.onnx").ok

    loaded = load_model(None)
    model = CqilModel(loaded.model, uniform_plan(15, 30, 2, 30, bypass=1))
    text = load_split(loaded.tokenizer, seq_len=SEQ_LEN).held_out[:CHUNKS]
    prompt, continuation = text[:, :-DECODE_STEPS], text[:, -DECODE_STEPS:]
    mask = torch.ones_like(prompt)
    sess = session(out / "model.onnx")

    logits, past = run(sess, prompt, mask)
    with torch.no_grad():
        expected, expected_past = model(prompt, mask)
    diffs = [np.abs(logits - expected.numpy()).max()]
    agree = [(logits.argmax(-1) == expected.argmax(-1).numpy()).mean()]
    # decode the held-out continuation token by token, ORT on its own presents
    with torch.no_grad():
        for step in range(DECODE_STEPS):
            token = continuation[:, step:step + 1]
            mask = torch.cat((mask, torch.ones_like(token)), 1)
            logits, past = run(sess, token, mask, past)
            expected, expected_past = model(token, mask, past_key_values=expected_past)
            diffs.append(np.abs(logits - expected.numpy()).max())
            agree.append((logits.argmax(-1) == expected.argmax(-1).numpy()).mean())
    kv_diff = max(np.abs(o - e.numpy()).max() for o, e in zip(past, expected_past))
    print(f"\nSmolLM2 S15:30:2 d=1, {CHUNKS}x{SEQ_LEN - DECODE_STEPS} held-out tokens + {DECODE_STEPS} decode "
          f"steps: max |logits ORT - PyTorch| prefill {diffs[0]:.2e}, decode {max(diffs[1:]):.2e}, "
          f"presents {kv_diff:.2e}, top-1 agreement {np.mean(agree):.4f}")
    assert max(diffs) <= 2e-3 and kv_diff <= 2e-3
    assert min(agree) == 1.0
