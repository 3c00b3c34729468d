"""`cqil compare`: plans side by side before and after the same recovery, on two held-out texts."""

from __future__ import annotations

import json

import pytest
from cqil.model.plan import from_parallel_groups, pruned_plan
from cqil.pipeline.cli import main
from cqil.pipeline.data import default_text

LAYERS = 6
COMMON = ["--seq-len", "32", "--max-chunks", "16", "--eval-chunks", "3", "--batch-size", "2"]


def test_compare_before_matches_eval_and_recovery_changes_every_plan(tiny_model_dir, tmp_path, capsys):
    model = str(tiny_model_dir("llama", LAYERS))
    pruned_plan([2, 4], LAYERS).save(tmp_path / "prune.json")
    from_parallel_groups([[1, 2], [3, 4]], LAYERS, 1).save(tmp_path / "cqil.json")
    second = tmp_path / "second.txt"
    second.write_text(default_text()[-20000:].upper())  # another kind of text for the tiny tokenizer
    out = tmp_path / "compare.json"
    assert main(["compare", "--model", model, "--plans", f"prune={tmp_path / 'prune.json'},cqil={tmp_path / 'cqil.json'}",
                 "--second-eval", str(second), "--recover-steps", "2", "--rank", "4", "--lr", "1e-2",
                 "--out", str(out), *COMMON]) == 0
    report = json.loads(out.read_text())
    assert set(report["before"]) == set(report["after"]) == {"held_out", str(second)}
    assert report["recovery"]["steps"] == 2 and report["recovery"]["rank"] == 4
    for name, plan in (("prune", "prune.json"), ("cqil", "cqil.json")):
        capsys.readouterr()
        assert main(["eval", "--model", model, "--plan", str(tmp_path / plan), "--json", "--seq-len", "32",
                     "--max-chunks", "3", "--batch-size", "2"]) == 0
        evaluated = json.loads(capsys.readouterr().out)
        for metric in ("kl", "top1", "ppl"):
            assert report["before"]["held_out"][name][metric] == pytest.approx(evaluated["cqil"][metric], rel=1e-5)
        for text in report["after"]:
            assert report["after"][text][name]["kl"] != pytest.approx(report["before"][text][name]["kl"], rel=1e-4)


@pytest.mark.parametrize("plans, message", [("a", "is not NAME=plan.json"), ("a=x.json,a=y.json", "names 'a' twice")])
def test_compare_refuses_bad_plan_lists(tiny_model_dir, capsys, plans, message):
    assert main(["compare", "--model", str(tiny_model_dir("llama", LAYERS)), "--plans", plans]) == 2
    assert message in capsys.readouterr().err


def test_compare_without_a_second_text(tiny_model_dir, tmp_path, capsys):
    """--second-eval '' means none, as its help says: only the training text's held-out part is compared."""
    model = str(tiny_model_dir("llama", LAYERS))
    pruned_plan([2], LAYERS).save(tmp_path / "prune.json")
    assert main(["compare", "--model", model, "--plans", f"prune={tmp_path / 'prune.json'}", "--second-eval", "",
                 "--json", *COMMON]) == 0
    assert set(json.loads(capsys.readouterr().out)["before"]) == {"held_out"}
