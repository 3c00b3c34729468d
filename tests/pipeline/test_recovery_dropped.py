"""Recovery, merge and eval of a hybrid plan (dropped layers and a CQIL group) through the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from cqil.model.cqil import CqilModel
from cqil.model.plan import CONFIG_KEY, from_parallel_groups, plan_from_config
from cqil.pipeline.cli import main
from cqil.pipeline.sources import load_model

PLAN = from_parallel_groups([[2, 3]], 6, 1, dropped=(0, 5))


def test_finetune_merge_eval_of_a_hybrid_plan(tiny_model_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    model = str(tiny_model_dir("llama", 6))
    plan_file, adapter, merged = tmp_path / "plan.json", tmp_path / "adapter", tmp_path / "merged"
    PLAN.save(plan_file)
    common = ["--seq-len", "32", "--max-chunks", "64"]
    assert main(["finetune", "--model", model, "--plan", str(plan_file), "--steps", "3", "--rank", "4",
                 "--lr", "1e-2", "--batch-size", "2", "--eval-chunks", "2", "--out", str(adapter), *common]) == 0
    weights = load_file(adapter / "adapter_model.safetensors")
    # a dropped layer never runs, so its adapter stays where LoRA starts (B = 0); a kept layer's moved
    assert all(not t.any() for name, t in weights.items() if ".layers.0." in name and "lora_B" in name)
    assert any(t.any() for name, t in weights.items() if ".layers.2." in name and "lora_B" in name)

    assert main(["merge", "--model", model, "--adapter", str(adapter), "--out", str(merged)]) == 0
    assert json.loads((merged / "config.json").read_text())[CONFIG_KEY]["dropped"] == [0, 5]
    capsys.readouterr()
    assert main(["eval", "--model", model, "--adapter", str(adapter), "--json", *common]) == 0
    with_adapter = json.loads(capsys.readouterr().out)
    assert main(["eval", "--model", str(merged), "--json", *common]) == 0
    from_merged = json.loads(capsys.readouterr().out)
    assert from_merged["plan"]["dropped"] == [0, 5]
    for metric, value in with_adapter["cqil"].items():
        assert from_merged["cqil"][metric] == pytest.approx(value, rel=1e-4, abs=1e-6), metric

    reloaded = load_model(merged).model
    ids = torch.randint(3, 300, (1, 9), generator=torch.Generator().manual_seed(2))
    logits, presents = CqilModel(reloaded, plan_from_config(reloaded.config))(ids)
    assert len(presents) == 2 * 4 and torch.isfinite(logits).all()
