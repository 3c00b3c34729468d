"""Export of hybrid plans (dropped layers and a CQIL group): both layouts match PyTorch, the cache holds only
the kept layers, genai_config.json counts them, the exported folder reloads under the same plan, and the
Triton text model generates what `cqil generate` does."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cqil.export.contract import read_contract
from cqil.model.cqil import CqilModel
from cqil.model.plan import from_parallel_groups, plan_from_config
from cqil.pipeline.cli import main

from tests.helpers import tiny_model
from tests.ort_runner import run, session

LAYERS = 5
PLAN = from_parallel_groups([[1, 2]], LAYERS, 1, dropped=(0, 4))  # kept 1-2 (a group, d=1) and 3


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    """Factory: (model, its folder, the plan file, the ONNX folder) of a family exported in a layout."""
    made = {}

    def make(family: str, layout: str):
        if (family, layout) not in made:
            tmp_path = tmp_path_factory.mktemp(f"{family}-{layout}")
            model = tiny_model(family, LAYERS)
            model.save_pretrained(tmp_path / "model")
            tokenizer.save_pretrained(tmp_path / "model")
            PLAN.save(tmp_path / "plan.json")
            out = tmp_path / "onnx"
            assert main(["export", "--model", str(tmp_path / "model"), "--plan", str(tmp_path / "plan.json"),
                         "--layout", layout, "--out", str(out)]) == 0
            made[family, layout] = model, tmp_path / "model", tmp_path / "plan.json", out
        return made[family, layout]

    return make


@pytest.mark.parametrize("family, layout", [("llama", "branches"), ("qwen2", "fused")])
def test_hybrid_plan_export_matches_pytorch(family, layout, exported):
    model, _, _, out = exported(family, layout)
    spec = read_contract(out / "model.onnx")
    assert spec.num_layers == 3 and spec.plan.dropped == (0, 4)
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["num_hidden_layers"] == 3
    from transformers import AutoConfig

    again = plan_from_config(AutoConfig.from_pretrained(out))
    assert (again.groups, again.dropped, again.bypass) == (PLAN.groups, PLAN.dropped, PLAN.bypass)

    reference = CqilModel(model, PLAN)
    sess = session(out / "model.onnx")
    ids = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    logits, past = run(sess, ids, mask)
    with torch.no_grad():
        expected, expected_past = reference(ids, mask)
    real = mask.bool().numpy()
    assert np.abs(logits[real] - expected.numpy()[real]).max() <= 1e-4
    assert len(past) == len(expected_past) == 6
    mask = torch.cat((mask, torch.ones(2, 1, dtype=torch.long)), 1)
    step = torch.tensor([[5], [6]])
    logits, _ = run(sess, step, mask, past)
    with torch.no_grad():
        expected, _ = reference(step, mask, past_key_values=expected_past)
    assert np.abs(logits - expected.numpy()).max() <= 1e-4


def test_triton_text_model_of_a_hybrid_plan_answers_what_cqil_generate_prints(exported, tmp_path, monkeypatch,
                                                                             capsys):
    from cqil.engines.triton import write_model_repository

    from tests.engines.test_triton import FakeRequest, load_text_model, run_requests

    _, model_dir, plan_file, out = exported("llama", "branches")
    prompt = "The for statement"
    capsys.readouterr()
    assert main(["generate", "--model", str(model_dir), "--plan", str(plan_file), "--raw", "--prompt", prompt,
                 "--max-new-tokens", "8"]) == 0
    expected = capsys.readouterr().out.strip()
    write_model_repository(out, tmp_path / "repo")
    text_model, _ = load_text_model(tmp_path / "repo" / "cqil_text" / "1", monkeypatch)
    request = FakeRequest({"text_input": np.array([prompt.encode()], dtype=object),
                           "max_tokens": np.array([8], dtype=np.int32)})
    run_requests(text_model, [request])
    assert not request.sender.errors()
    assert request.sender.texts()[0].strip() == expected


def test_bench_times_a_hybrid_plan_against_the_original(exported, tmp_path):
    from cqil.engines.bench import BenchSettings, run_bench

    _, model_dir, _, out = exported("llama", "branches")
    assert main(["export", "--model", str(model_dir), "--original", "--out", str(tmp_path / "original")]) == 0
    settings = BenchSettings(batch=1, seq=4, past=4, prefill_repeats=2, decode_repeats=2, warmup=0, threads=1)
    result = run_bench(out, tmp_path / "original", settings, progress=False)
    assert result["ideal_depth_ratio"] == pytest.approx(2 / 5)  # groups (1-2) and (3) of 5 layers
    assert result["scenarios"]["decode"]["ratio"] > 0
