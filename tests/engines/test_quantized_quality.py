"""Quality of a quantized export as the user sees it: `cqil validate`'s greedy-token agreement on the fixed
prompts, `cqil eval --onnx` with the original at the same precision, and the build report's rows.

One tiny int4 export (4-layer llama, groups 1-3, d = 1) is shared by the module; every expected figure
is computed here again with the test's own ONNX Runtime driver (tests/ort_runner.py) and PyTorch.
"""

from __future__ import annotations

import json
import math

import onnx
import pytest
import torch
import torch.nn.functional as F
from cqil.engines.greedy_agreement import NEW_TOKENS, PROMPTS
from cqil.export import contract
from cqil.model.cqil import CqilModel
from cqil.model.plan import Plan, identity_plan
from cqil.model.steps import greedy_generate
from cqil.pipeline.cli import main
from cqil.pipeline.data import load_split
from cqil.pipeline.report import _quality_rows
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.ort_runner import greedy, run, session

PLAN = Plan(((0,), (1, 2, 3)), 1)
PLAN_OPTIONS = ["--groups", "1-3", "--bypass", "1"]


@pytest.fixture(scope="module")
def int4_export(tmp_path_factory, tiny_model_dir):
    """(model dir, int4 folder): the shared tiny checkpoint exported at int4 with the default quantization."""
    model_dir = tiny_model_dir("llama", 4)
    out = tmp_path_factory.mktemp("int4") / "onnx"
    assert main(["export", "--model", str(model_dir), *PLAN_OPTIONS, "--precision", "int4", "--out", str(out)]) == 0
    return model_dir, out


def metadata(folder) -> dict[str, str]:
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    return {prop.key: prop.value for prop in model.metadata_props}


def test_validate_reports_greedy_agreement_on_the_fixed_prompts(int4_export, tmp_path, capsys):
    model_dir, folder = int4_export
    out = tmp_path / "validation.json"
    status = main(["validate", "--onnx", str(folder), "--threads", "1", "--seq-len", "24", "--decode-steps", "2",
                   "--out", str(out)])
    stdout = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert status in (0, 1)  # the tiny random model's int4 quality is no concern here: the report is
    greedy_result = result["engines"]["onnxruntime"]["greedy"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reference = CqilModel(AutoModelForCausalLM.from_pretrained(model_dir).eval(), PLAN)
    int4 = session(folder / "model.onnx")
    rows = greedy_result["per_prompt"]
    assert len(rows) == len(PROMPTS) == greedy_result["prompts"] and greedy_result["new_tokens"] == NEW_TOKENS
    identical, prefix = 0, 0
    for text, row in zip(PROMPTS, rows):
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        mask = torch.ones_like(ids)
        expected = greedy_generate(reference, ids, mask, NEW_TOKENS)[0].tolist()
        actual = greedy(int4, ids, mask, NEW_TOKENS)[0].tolist()
        assert row["reference"] == expected and row["engine"] == actual
        same = [a == b for a, b in zip(expected, actual)]
        identical += all(same)
        prefix += same.index(False) if False in same else NEW_TOKENS
    assert greedy_result["identical"] == identical
    assert greedy_result["prefix_agreement"] == pytest.approx(prefix / (len(PROMPTS) * NEW_TOKENS), abs=1e-4)
    assert f"greedy tokens on {len(PROMPTS)} fixed prompts x {NEW_TOKENS}: {identical} identical" in stdout


def test_validate_of_an_fp32_file_has_no_greedy_section(tiny_cqil_onnx, tmp_path, capsys):
    """fp32 matches PyTorch to 1e-4 by element: the greedy comparison is for quantized weights only."""
    out = tmp_path / "validation.json"
    assert main(["validate", "--onnx", str(tiny_cqil_onnx[1]), "--threads", "1", "--seq-len", "24",
                 "--decode-steps", "2", "--out", str(out)]) == 0
    assert "greedy" not in json.loads(out.read_text())["engines"]["onnxruntime"]
    assert "greedy tokens" not in capsys.readouterr().out


def ort_perplexity(folder, chunks: torch.Tensor) -> float:
    sess = session(folder / "model.onnx")
    logits = torch.from_numpy(run(sess, chunks, torch.ones_like(chunks))[0]).double()
    nll = -F.log_softmax(logits[:, :-1], -1).gather(-1, chunks[:, 1:, None]).mean()
    return math.exp(float(nll))


def test_eval_puts_the_original_and_cqil_side_by_side_at_the_export_precision(int4_export, cache_env, capsys):
    model_dir, folder = int4_export
    status = main(["eval", "--model", str(model_dir), *PLAN_OPTIONS, "--onnx", str(folder), "--seq-len", "16",
                   "--max-chunks", "3", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert status in (0, None)
    chunks = load_split(AutoTokenizer.from_pretrained(model_dir), None, None, 16).held_out[:3]
    # the original at int4 went to the cache, quantized exactly as the CQIL file was
    (original_folder,) = [path for path in (cache_env / "reference").iterdir() if "-int4-" in path.name]
    assert metadata(original_folder)[contract.QUANTIZATION_KEY] == metadata(folder)[contract.QUANTIZATION_KEY]
    assert result["cqil_int4"]["ppl"] == pytest.approx(ort_perplexity(folder, chunks), rel=1e-3)
    assert result["original_int4"]["ppl"] == pytest.approx(ort_perplexity(original_folder, chunks), rel=1e-3)
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        fp32 = F.log_softmax(CqilModel(hf, identity_plan(4))(chunks)[0].double(), -1)
        int4 = F.log_softmax(torch.from_numpy(run(session(folder / "model.onnx"), chunks, torch.ones_like(chunks))[0])
                             .double(), -1)
    kl = float((fp32.exp() * (fp32 - int4)).sum(-1).mean())  # against the fp32 original, as every row
    assert result["cqil_int4"]["kl"] == pytest.approx(kl, rel=1e-3)
    assert {"original", "cqil"} <= set(result)


def test_report_rows_name_the_precision_of_both_sides():
    quality = {"original": {"ppl": 10.0}, "cqil": {"ppl": 11.0, "kl": 0.2, "top1": 0.8},
               "original_int4": {"ppl": 10.5, "kl": 0.05, "top1": 0.9}, "cqil_int4": {"ppl": 11.55, "kl": 0.25, "top1": 0.78}}
    rows = _quality_rows(quality, "auto")
    assert "| original, int4 export | 10.500 | 1.050 | 0.0500 | 0.900 |" in rows
    assert "| CQIL auto, int4 export (shipped) | 11.550 | 1.155 | 0.2500 | 0.780 |" in rows
