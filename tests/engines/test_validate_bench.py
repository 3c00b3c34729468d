"""`cqil validate` and `cqil bench` on the shared tiny export (`tiny_cqil_onnx`).

Validation: the export passes against PyTorch; the same export with one weight changed by 0.5
fails with exit 1. Bench: the cqil-bench/1 fields, the reference exported once into the cache,
`cqil gate` reading the result, and the chart.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from cqil.engines.bench import BenchSettings, run_bench
from cqil.engines.latency import bench_from_dict
from cqil.engines.tolerances import DEFAULT_THRESHOLDS
from cqil.engines.validate import validate_onnx
from cqil.model.cqil import CqilModel
from cqil.model.errors import CqilError
from cqil.model.plan import Plan
from cqil.pipeline.cli import main
from onnx import numpy_helper

PLAN = Plan(((0,), (1, 2, 3)), 1)
FAST_BENCH = ["--seq", "8", "--past", "8", "--prefill-repeats", "5", "--decode-repeats", "5", "--warmup", "1",
              "--threads", "1"]


@pytest.fixture(scope="module")
def perturbed(tmp_path_factory, tiny_cqil_onnx):
    """The export with 0.5 added to one element of layer 2's down_proj weight (a branch of group 1)."""
    out = tmp_path_factory.mktemp("perturbed") / "onnx"
    shutil.copytree(tiny_cqil_onnx[1], out)
    model = onnx.load(str(out / "model.onnx"))
    down = next(node for node in model.graph.node if node.name == "/g1/l2/ffn/down_proj/MatMul")
    index, init = next((i, t) for i, t in enumerate(model.graph.initializer) if t.name in down.input)
    array = numpy_helper.to_array(init).copy()
    array.flat[0] += 0.5
    model.graph.initializer[index].CopyFrom(numpy_helper.from_array(array, init.name))
    onnx.save(model, str(out / "model.onnx"))
    return out


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        cache = tmp_path_factory.mktemp("cache")
        patch.setenv("CQIL_CACHE", str(cache))
        yield cache


def run_cli(argv, capsys):
    status = main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_validate_passes_and_writes_json(tiny_cqil_onnx, tmp_path, capsys):
    out = tmp_path / "validation.json"
    status, stdout, _ = run_cli(["validate", "--onnx", str(tiny_cqil_onnx[1]), "--threads", "1",
                                 "--seq-len", "24", "--decode-steps", "4", "--out", str(out)], capsys)
    assert status == 0, stdout
    result = json.loads(out.read_text())
    assert result["passed"] and result["precision"] == "fp32"
    assert result["plan"]["groups"] == [[0], [1, 2, 3]] and result["plan"]["bypass"] == 1
    assert result["structure"] == {"checked": True, "layout": "branches", "passed": True,
                                   "detail": "branch structure ok: 2 groups, 4 branches"}
    ort = result["engines"]["onnxruntime"]
    for phase, positions in (("prefill", 2 * 20), ("decode", 2 * 4)):
        block = ort[phase]
        assert block["passed"] and block["top1"] == 1.0 and block["positions"] == positions
        assert 0 < block["logits"]["max_abs"] < 1e-4 and block["kl"] < 1e-8
        assert set(block["outputs"]) == {"logits", *(f"present.{i}.{s}" for i in range(4) for s in ("key", "value"))}
    assert result["data"] == {"chunks": 2, "seq_len": 24, "prefill_tokens": 20, "decode_steps": 4}
    assert "validation passed" in stdout


def test_perturbed_weight_fails_with_exit_1(perturbed, tiny_cqil_onnx, capsys, tmp_path):
    out = tmp_path / "validation.json"
    status, stdout, _ = run_cli(["validate", "--onnx", str(perturbed), "--model", str(tiny_cqil_onnx[0]),
                                 "--threads", "1", "--seq-len", "24", "--decode-steps", "4", "--out", str(out)],
                                capsys)
    assert status == 1
    result = json.loads(out.read_text())
    assert not result["passed"]
    block = result["engines"]["onnxruntime"]["prefill"]
    assert not block["logits"]["passed"] and block["logits"]["max_abs"] > 1e-3
    # Layer 2's own cache is computed before its FFN: it stays exact; layer 3 reads the changed stream.
    assert block["outputs"]["present.2.key"]["passed"] and block["outputs"]["present.1.key"]["passed"]
    assert "FAIL" in stdout and "validation FAILED" in stdout


def test_validate_onnx_function_and_thresholds(tiny_cqil_onnx, perturbed):
    from transformers import AutoModelForCausalLM

    reference = CqilModel(AutoModelForCausalLM.from_pretrained(tiny_cqil_onnx[0]).eval(), PLAN)
    chunks = torch.randint(3, 384, (1, 12), generator=torch.Generator().manual_seed(0))
    good = validate_onnx(tiny_cqil_onnx[1], reference, chunks, decode_steps=3, threads=1, progress=False)
    assert good["passed"] and good["thresholds"] == DEFAULT_THRESHOLDS["FLOAT"].to_dict()
    # The same comparison measured independently: ORT logits vs PyTorch on the prefill.
    from cqil.engines.onnxruntime import OrtRunner

    with torch.no_grad():
        expected = (OrtRunner(tiny_cqil_onnx[1], threads=1)(chunks[:, :9])[0] - reference(chunks[:, :9])[0]).abs().max()
    assert good["engines"]["onnxruntime"]["prefill"]["logits"]["max_abs"] == pytest.approx(float(expected), rel=1e-3)
    assert not validate_onnx(perturbed, reference, chunks, decode_steps=3, threads=1, progress=False)["passed"]
    with pytest.raises(CqilError, match="differs from the plan"):
        validate_onnx(tiny_cqil_onnx[1], reference.with_plan(Plan(((0, 1), (2, 3)), 0)), chunks, progress=False)
    with pytest.raises(CqilError, match="--decode-steps 12"):
        validate_onnx(tiny_cqil_onnx[1], reference, chunks, decode_steps=12, progress=False)


def test_validate_bad_inputs(tiny_cqil_onnx, tmp_path, capsys):
    onnx_dir = str(tiny_cqil_onnx[1])
    wrong_plan = tmp_path / "plan.json"
    Plan(((0, 1), (2, 3)), 0).save(wrong_plan)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model.onnx").write_bytes(b"\x00garbage")
    cases = [
        (["--onnx", str(tmp_path / "missing")], "does not exist"),
        (["--onnx", str(corrupt)], "not a readable ONNX model"),
        (["--onnx", onnx_dir, "--plan", str(wrong_plan)], "is not the plan"),
        (["--onnx", onnx_dir, "--engine", str(tmp_path / "model.plan")], "--engine"),
        (["--onnx", onnx_dir, "--chunks", "0"], "--chunks 0"),
    ]
    for argv, message in cases:
        status, _, err = run_cli(["validate", *argv], capsys)
        assert status == 2 and message in err and err.count("\n") == 1, (argv, err)


def test_bench_json_gate_chart_and_cached_reference(tiny_cqil_onnx, bench_cache, tmp_path, capsys):
    out = tmp_path / "latency.json"
    status, stdout, _ = run_cli(["bench", "--onnx", str(tiny_cqil_onnx[1]), *FAST_BENCH, "--out", str(out)], capsys)
    assert status == 0
    result = json.loads(out.read_text())
    parsed = bench_from_dict(result)  # the layout `cqil gate` reads
    assert set(parsed.scenarios) == {"prefill", "decode"}
    assert result["ideal_depth_ratio"] == 0.5  # 2 groups / 4 layers
    assert result["scenarios"]["decode"]["shape"] == {"batch": 1, "seq": 1, "past": 8}
    assert result["scenarios"]["prefill"]["shape"] == {"batch": 1, "seq": 8, "past": 0}
    for scenario in result["scenarios"].values():
        ref, cand = scenario["reference"], scenario["candidate"]
        assert ref["n"] == cand["n"] == 5 and 0 < ref["p50_ms"] <= ref["p90_ms"] <= ref["p99_ms"]
        assert scenario["ratio"] == pytest.approx(cand["p50_ms"] / ref["p50_ms"], rel=1e-3)
        low, high = scenario["ratio_ci"]
        assert low <= scenario["ratio"] <= high
        assert set(scenario["rows"]) == {"pytorch_reference", "pytorch_candidate"}
        assert scenario["rows"]["pytorch_candidate"]["ratio"] > 0
    # The reference was exported once into the cache, as the original model.
    references = list((bench_cache / "reference").iterdir())
    assert len(references) == 1 and result["reference"]["onnx"] == str(references[0] / "model.onnx")
    reference_plan = json.loads({p.key: p.value for p in onnx.load(
        str(references[0] / "model.onnx"), load_external_data=False).metadata_props}["cqil.plan"])
    assert reference_plan["groups"] == [[0], [1], [2], [3]]
    chart = out.with_suffix(".png")
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ratio candidate/reference" in stdout
    # cqil gate reads it: a generous limit passes, an impossible one fails.
    assert main(["gate", str(out), "--max-ratio", "1000"]) == 0
    assert main(["gate", str(out), "--max-ratio", "0.0001"]) == 1
    # A second bench reuses the cached reference (no new export).
    mtime = (references[0] / "model.onnx").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["bench", "--onnx", str(tiny_cqil_onnx[1]), *FAST_BENCH, "--no-torch", "--json"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert "rows" not in second["scenarios"]["decode"]
    assert (references[0] / "model.onnx").stat().st_mtime_ns == mtime
    assert len(list((bench_cache / "reference").iterdir())) == 1


def test_run_bench_function_and_chart_bytes(tiny_cqil_onnx, bench_cache, tmp_path):
    from cqil.engines.bench_report import plot_bench

    reference = next((bench_cache / "reference").iterdir(), None)
    if reference is None:  # run alone: make the cached reference first
        assert main(["bench", "--onnx", str(tiny_cqil_onnx[1]), *FAST_BENCH, "--no-torch"]) == 0
        reference = next((bench_cache / "reference").iterdir())
    settings = BenchSettings(seq=4, past=4, prefill_repeats=3, decode_repeats=3, warmup=0, threads=1)
    result = run_bench(tiny_cqil_onnx[1], reference, settings, progress=False)
    assert result["format"] == "cqil-bench/1" and result["settings"]["threads"] == 1
    assert result["candidate"]["layout"] == "branches" and result["depth"] == {"groups": 2, "layers": 4}
    first, second = plot_bench(result, tmp_path / "a.png"), plot_bench(result, tmp_path / "b.png")
    assert first.read_bytes() == second.read_bytes()
    with pytest.raises(CqilError, match="is a CQIL model"):
        run_bench(tiny_cqil_onnx[1], tiny_cqil_onnx[1], settings, progress=False)
    with pytest.raises(CqilError, match="--seq 0"):
        BenchSettings(seq=0)


def test_bench_bad_inputs(tiny_cqil_onnx, tmp_path, capsys):
    cases = [
        (["--onnx", str(tmp_path / "missing")], "does not exist"),
        (["--onnx", str(tiny_cqil_onnx[1]), "--reference", str(tmp_path / "nope")], "does not exist"),
        (["--onnx", str(tiny_cqil_onnx[1]), "--decode-repeats", "0", "--no-torch"], "--decode-repeats 0"),
    ]
    for argv, message in cases:
        status, _, err = run_cli(["bench", *argv], capsys)
        assert status == 2 and message in err and err.count("\n") == 1, (argv, err)


def test_interleaved_rows_keep_numpy_medians():
    """The PyTorch candidate row's ratio is a ratio of medians, like the ORT rows (engines.latency)."""
    from cqil.engines.bench import _torch_rows

    ref, cand = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 2.0, 6.0, 6.0])
    rows = _torch_rows({"pytorch_reference": ref, "pytorch_candidate": cand}, seed=0)
    assert rows["pytorch_candidate"]["ratio"] == pytest.approx(4.0 / 2.5)
    assert rows["pytorch_reference"]["p50_ms"] == pytest.approx(2500.0)


def test_bench_schedule_packed_times_the_packed_pytorch_model(tiny_cqil_onnx, bench_cache, tmp_path, capsys):
    """--schedule reaches every PyTorch schedule: packed stacks the CQIL groups; streams needs CUDA."""
    from cqil.engines.bench import schedule_models
    from transformers import AutoModelForCausalLM

    status, stdout, _ = run_cli(["bench", "--onnx", str(tiny_cqil_onnx[1]), *FAST_BENCH, "--schedule", "packed",
                                 "--json"], capsys)
    assert status == 0
    result = json.loads(stdout)
    assert result["settings"]["schedule"] == "packed"
    assert set(result["scenarios"]["decode"]["rows"]) == {"pytorch_reference", "pytorch_candidate"}
    hf = AutoModelForCausalLM.from_pretrained(tiny_cqil_onnx[0]).eval()
    packed, sequential = schedule_models(hf, PLAN, "packed"), schedule_models(hf, PLAN, "sequential")
    assert list(packed["candidate"].packed) == ["1"] and not sequential["candidate"].packed  # group 1-3 packed
    assert not packed["reference"].packed  # the original model has no group to pack
    ids = torch.randint(3, 384, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (packed["candidate"](ids)[0] - sequential["candidate"](ids)[0]).abs().max() < 1e-4
    status, _, err = run_cli(["bench", "--ranks", "2", "--model", str(tiny_cqil_onnx[0]), "--schedule", "packed"], capsys)
    assert status == 2 and "--schedule packed is for the one-process PyTorch rows" in err  # refused before launch
    if not torch.cuda.is_available():
        status, _, err = run_cli(["bench", "--onnx", str(tiny_cqil_onnx[1]), "--schedule", "streams"], capsys)
        assert status == 2 and "--schedule streams" in err and "needs a CUDA GPU" in err and err.count("\n") == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the streams schedule needs a CUDA GPU")
def test_bench_schedule_streams_times_pytorch_on_cuda_streams(tiny_cqil_onnx, bench_cache, capsys):
    status, stdout, _ = run_cli(["bench", "--onnx", str(tiny_cqil_onnx[1]), *FAST_BENCH, "--schedule", "streams",
                                 "--json"], capsys)
    assert status == 0
    result = json.loads(stdout)
    assert result["settings"]["schedule"] == "streams" and "pytorch_candidate" in result["scenarios"]["decode"]["rows"]


def test_validate_reports_held_out_perplexity_of_both_sides(tiny_cqil_onnx, perturbed):
    """Perplexity over the chunks' next tokens (prefill and decode positions) equals exp of the mean cross-entropy
    that PyTorch computes over the whole sequence at once; the perturbed file's ratio moves away from 1."""
    from transformers import AutoModelForCausalLM

    reference = CqilModel(AutoModelForCausalLM.from_pretrained(tiny_cqil_onnx[0]).eval(), PLAN)
    chunks = torch.randint(3, 384, (2, 12), generator=torch.Generator().manual_seed(1))
    result = validate_onnx(tiny_cqil_onnx[1], reference, chunks, decode_steps=3, threads=1, progress=False)
    with torch.no_grad():
        logits = reference(chunks)[0]
    expected = float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(),
                                                       chunks[:, 1:].reshape(-1)).exp())
    ppl = result["engines"]["onnxruntime"]["perplexity"]
    assert ppl["tokens"] == 2 * 11 and ppl["reference"] == pytest.approx(expected, rel=1e-5)
    assert ppl["ratio"] == pytest.approx(1.0, abs=1e-5) and ppl["passed"]
    bad = validate_onnx(perturbed, reference, chunks, decode_steps=3, threads=1, progress=False)
    assert abs(bad["engines"]["onnxruntime"]["perplexity"]["ratio"] - 1.0) > 1e-4  # measured 7e-4
