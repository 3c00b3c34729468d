"""Each command's `run` called directly does what `cqil <command>` does (the build's stages call the same `run`)."""

from __future__ import annotations

import json

import pytest
import torch
from cqil.model.plan import load_plan, parse_uniform_spec
from cqil.pipeline.cli import main
from cqil.pipeline.commands import finetune, generate, plan
from cqil.pipeline.data import load_split
from cqil.pipeline.recovery_settings import FinetuneSettings
from cqil.pipeline.sources import load_model
from safetensors.torch import load_file

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


def test_plan_search_finds_the_plan_the_command_finds(tiny_model_dir, tmp_path, capsys):
    model = tiny_model_dir("llama")
    out = tmp_path / "plan.json"
    assert main(["plan", "--auto", "--model", str(model), "--target-depth", "4", "--seq-len", "32",
                 "--max-chunks", "2", "--eval-chunks", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    loaded = load_model(model)
    settings = plan.AutoPlanSettings(target_depth=4, calibration_chunks=2, eval_chunks=2)
    result = plan.search(settings, loaded, load_split(loaded.tokenizer, seq_len=32))
    assert result.plan.groups == load_plan(out, 6).groups and result.plan.depth == 4
    assert json.loads(out.with_suffix(".search.json").read_text())["plan"]["groups"] == [list(g) for g in
                                                                                          result.plan.groups]
