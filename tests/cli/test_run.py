"""Each command's `run` called directly does what `cqil <command>` does (the build's stages call the same `run`)."""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from cqil.engines.bench_settings import BenchSettings
from cqil.engines.gate import gate_result
from cqil.engines.tensorrt.options import EngineOptions
from cqil.export.contract import find_onnx, read_contract
from cqil.model.cqil import CqilModel
from cqil.model.plan import load_plan, parse_uniform_spec, plan_from_config
from cqil.pipeline.build_config import STAGE_ORDER, load_config
from cqil.pipeline.cli import COMMAND_MODULES, main
from cqil.pipeline.commands import (
    analyze,
    bench,
    compare,
    engine,
    export,
    finetune,
    gate,
    generate,
    merge,
    plan,
    triton,
    validate,
    verify,
)
from cqil.pipeline.commands import build as build_command
from cqil.pipeline.commands import eval as eval_command
from cqil.pipeline.commands.options import DataSettings
from cqil.pipeline.data import chunk_tokens, load_split
from cqil.pipeline.recovery_settings import FinetuneSettings
from cqil.pipeline.reference import cached_reference
from cqil.pipeline.sources import load_model
from safetensors.torch import load_file

from tests.helpers import build_args

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_generate_run_prints_what_the_command_prints(tiny_model_dir, capsys):
    model = tiny_model_dir("llama")
    assert main(["generate", "--model", str(model), "--uniform", "1:5:2", "--prompt", "def main", "--prompt", "class",
                 "--max-new-tokens", "4", "--raw"]) == 0
    printed = capsys.readouterr().out
    settings = generate.GenerateSettings(prompts=("def main", "class"), max_new_tokens=4, raw=True)
    assert generate.run(settings, load_model(model), parse_uniform_spec("1:5:2", 6, 0)) + "\n" == printed


def test_finetune_run_trains_the_adapter_the_command_trains(tiny_model_dir, tmp_path, capsys):
    model = tiny_model_dir("llama")
    assert main(["finetune", "--model", str(model), "--uniform", "1:5:2", "--steps", "2", "--seq-len", "16",
                 "--max-chunks", "4", "--batch-size", "2", "--eval-chunks", "1", "--rank", "4",
                 "--out", str(tmp_path / "cli")]) == 0
    capsys.readouterr()
    loaded = load_model(model)
    split = load_split(loaded.tokenizer, seq_len=16)
    settings = FinetuneSettings(steps=2, batch_size=2, eval_chunks=1, rank=4)
    record = finetune.run(settings, loaded, parse_uniform_spec("1:5:2", 6, 0), split.train[:4], split.held_out,
                          tmp_path / "run")
    assert record["steps"] == 2
    ours, theirs = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("run", "cli"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_plan_run_finds_the_plan_the_command_finds(tiny_model_dir, tmp_path, capsys):
    model = tiny_model_dir("llama")
    out = tmp_path / "plan.json"
    assert main(["plan", "--auto", "--model", str(model), "--target-depth", "4", "--seq-len", "32",
                 "--max-chunks", "2", "--eval-chunks", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    loaded = load_model(model)
    settings = plan.AutoPlanSettings(target_depth=4, calibration_chunks=2, eval_chunks=2)
    result = plan.run(settings, loaded, load_split(loaded.tokenizer, seq_len=32))
    assert result.plan.groups == load_plan(out, 6).groups and result.plan.depth == 4
    assert json.loads(out.with_suffix(".search.json").read_text())["plan"]["groups"] == [list(g) for g in
                                                                                          result.plan.groups]


# -- every other command, on the tiny build's artifacts (tests/pipeline/conftest.py `built`) ---------------

def _copy(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to)
    return to


def _held_out(loaded, seq_len: int = 32):
    return load_split(loaded.tokenizer, seq_len=seq_len).held_out


def test_every_command_module_has_a_run():
    assert [name for name in COMMAND_MODULES
            if not callable(getattr(importlib.import_module(f"cqil.pipeline.commands.{name}"), "run", None))] == []


def test_analyze_run_writes_what_the_command_writes(tiny_model_dir, tmp_path, capsys):
    model = tiny_model_dir("llama")
    assert main(["analyze", "--model", str(model), "--seq-len", "32", "--max-chunks", "2",
                 "--out", str(tmp_path / "cli")]) == 0
    capsys.readouterr()
    loaded = load_model(model)
    (tmp_path / "run").mkdir()
    analyze.run(DataSettings(seq_len=32, max_chunks=2), loaded, load_split(loaded.tokenizer, seq_len=32),
                tmp_path / "run")
    assert (tmp_path / "run" / "similarity.json").read_text() == (tmp_path / "cli" / "similarity.json").read_text()


def test_eval_run_measures_what_the_command_prints(tiny_model_dir, capsys):
    model = tiny_model_dir("llama")
    assert main(["eval", "--model", str(model), "--uniform", "1:5:2", "--seq-len", "32", "--max-chunks", "2",
                 "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    loaded = load_model(model)
    result, names = eval_command.run(loaded, parse_uniform_spec("1:5:2", 6, 0), _held_out(loaded)[:2], 4)
    assert names == ["cqil"]
    for name in ("original", "cqil"):
        assert result[name] == pytest.approx(printed[name]), name


def test_merge_run_saves_the_weights_the_command_saves(built, tmp_path, capsys):
    model, build = built
    adapter, plan_file = build / "recover" / "adapter", build / "plan" / "plan.json"
    assert main(["merge", "--model", str(model), "--plan", str(plan_file), "--adapter", str(adapter),
                 "--out", str(tmp_path / "cli")]) == 0
    capsys.readouterr()
    merge.run(load_model(model), load_plan(plan_file, 6), adapter, tmp_path / "run")
    ours, theirs = (load_file(tmp_path / name / "model.safetensors") for name in ("run", "cli"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_export_run_writes_the_bytes_of_the_build_export_stage(built, tmp_path):
    _, build = built
    loaded = load_model(build / "merge" / "model")
    plan = plan_from_config(loaded.model.config)
    export.run(export.ExportSettings(), loaded, plan, tmp_path / "onnx", source={"name": loaded.name})
    assert (tmp_path / "onnx" / "model.onnx").read_bytes() == (build / "export" / "onnx" / "model.onnx").read_bytes()


def test_engine_run_writes_the_scripts_the_command_writes(built, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails even where TensorRT exists
    cli, ours = (_copy(built[1] / "export" / "onnx", tmp_path / name / "onnx") for name in ("cli", "run"))
    assert main(["engine", "--onnx", str(cli), "--out", str(cli.parent / "model.plan"), "--precision", "fp16"]) == 0
    assert "NOT built" in capsys.readouterr().out
    result = engine.run(EngineOptions(precision="fp16"), ours, ours.parent / "model.plan")
    assert not result.built and result.settings.aux_streams == 1  # groups of 2 (1:5:2)
    assert sorted(result.scripts) == ["build_engine.sh", "check_engine.sh", "data_loader.py"]
    for name, path in result.scripts.items():
        assert path == ours / name and path.read_text() == (cli / name).read_text(), name


def test_triton_run_writes_the_repository_the_command_writes(built, tmp_path, capsys):
    onnx = built[1] / "export" / "onnx"
    assert main(["triton", "--onnx", str(onnx), "--out", str(tmp_path / "cli"), "--name", "tiny"]) == 0
    capsys.readouterr()
    repository = triton.run(triton.TritonSettings(name="tiny"), onnx, tmp_path / "run")
    assert sorted(repository.models) == sorted(p.name for p in (tmp_path / "cli").iterdir() if p.is_dir())
    for name in repository.models:
        assert ((tmp_path / "run" / name / "config.pbtxt").read_text()
                == (tmp_path / "cli" / name / "config.pbtxt").read_text()), name


def test_validate_run_compares_as_the_command_does(built, tmp_path, capsys):
    _, build = built
    onnx, merged = build / "export" / "onnx", build / "merge" / "model"
    assert main(["validate", "--onnx", str(onnx), "--model", str(merged), "--seq-len", "32", "--chunks", "1",
                 "--decode-steps", "2", "--out", str(tmp_path / "v.json")]) == 0
    capsys.readouterr()
    cli = json.loads((tmp_path / "v.json").read_text())
    loaded = load_model(merged)
    result = validate.run(validate.ValidateSettings(chunks=1, decode_steps=2), find_onnx(onnx),
                          CqilModel(loaded.model, plan_from_config(loaded.model.config)), _held_out(loaded))
    assert result["passed"] and cli["passed"]
    assert {k: v for k, v in result.items() if k != "seconds"} == {k: v for k, v in cli.items()
                                                                  if k not in ("seconds", "reference_model")}


def test_bench_run_times_what_the_command_times(built, cache_env, tmp_path, capsys):
    onnx, merged = find_onnx(built[1] / "export" / "onnx"), str(built[1] / "merge" / "model")
    fast = ["--seq", "4", "--past", "4", "--prefill-repeats", "2", "--decode-repeats", "2", "--warmup", "0",
            "--threads", "1"]
    assert main(["bench", "--onnx", str(onnx), "--model", merged, *fast, "--no-torch",
                 "--out", str(tmp_path / "cli.json")]) == 0
    capsys.readouterr()
    cli = json.loads((tmp_path / "cli.json").read_text())
    reference = cached_reference(read_contract(onnx), onnx, merged)  # exported into the cache by the command
    settings = BenchSettings(seq=4, past=4, prefill_repeats=2, decode_repeats=2, warmup=0, threads=1)
    result = bench.run(settings, onnx, reference, None, bench.BenchOutput(out=tmp_path / "run.json"))
    assert json.loads((tmp_path / "run.json").read_text())["scenarios"].keys() == result["scenarios"].keys()
    for key in ("settings", "reference", "candidate", "depth"):
        assert result[key] == cli[key], key


def test_gate_run_checks_what_the_command_checks(built, tmp_path, capsys):
    latency = built[1] / "bench" / "latency.json"
    assert main(["gate", str(latency), "--max-ratio", "100", "--json", str(tmp_path / "gate.json")]) == 0
    capsys.readouterr()
    checks, rule = gate.run(latency, max_ratio=100.0)
    assert gate_result(checks, rule) == json.loads((tmp_path / "gate.json").read_text())
    assert all(check.passed for check in checks) and rule == "max ratio 100"


def test_verify_run_is_what_the_command_prints(built, capsys):
    assert main(["verify", str(built[1]), "--json"]) == 0
    assert verify.run(built[1]) == json.loads(capsys.readouterr().out)
    assert verify.run(built[1])["ok"] and verify.run(built[1])["files_checked"] > 10


def test_compare_run_reports_what_the_command_reports(built, tmp_path, capsys):
    model, build = built
    plan_file, second = build / "plan" / "plan.json", tmp_path / "second.txt"
    second.write_text("def second(text):\n    return text.upper() + ' of another kind'\n" * 40)
    assert main(["compare", "--model", str(model), "--plans", f"uniform={plan_file}", "--second-eval", str(second),
                 "--eval-chunks", "1", "--seq-len", "32", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    loaded = load_model(model)
    split = load_split(loaded.tokenizer, seq_len=32)
    texts = {"held_out": split.held_out[:1], str(second): chunk_tokens(loaded.tokenizer, second.read_text(), 32)[:1]}
    report = compare.run(model, {"uniform": load_plan(plan_file, 6)}, split.train, texts, None, 4)
    assert report["before"].keys() == {"held_out", str(second)}
    for text, rows in report["before"].items():
        for name, row in rows.items():
            assert row == pytest.approx(printed["before"][text][name]), (text, name)


def test_build_run_finds_the_command_build_up_to_date(built, tmp_path, capsys):
    model, build = built
    out = _copy(build, tmp_path / "artifacts")
    overrides = [*build_args(model, out)[6::2], f'source.model="{model}"']  # the --set values, --model
    results, _ = build_command.run(load_config(None, overrides), out)
    assert [result.name for result in results] == list(STAGE_ORDER)
    assert {result.status for result in results} == {"skipped"}  # up to date
    assert main(["verify", str(out)]) == 0
