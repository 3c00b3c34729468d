"""The `cqil` commands end to end on a tiny checkpoint, and their one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

from cqil.pipeline.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_command_writes_a_plan_for_the_model(tiny_model_dir, tmp_path, capsys):
    model = tiny_model_dir("llama")
    code, out, _ = _run(capsys, "plan", "--model", str(model), "--uniform", "1:5:2", "--bypass", "1",
                        "--out", str(tmp_path / "plan.json"))
    assert code == 0 and "depth 4/6" in out
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["groups"] == [[0], [1, 2], [3, 4], [5]] and plan["bypass"] == 1
    assert plan["model"]["num_layers"] == 6 and plan["model"]["model_type"] == "llama"


def test_plan_command_reads_official_config(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "official.json").write_text(json.dumps({"cqil_layers": [[2, 3]], "d": 1}))
    code, _, _ = _run(capsys, "plan", "--model", str(tiny_model_dir("llama")), "--official",
                      str(tmp_path / "official.json"), "--out", str(tmp_path / "plan.json"))
    assert code == 0
    assert json.loads((tmp_path / "plan.json").read_text())["groups"][2] == [2, 3]


def test_eval_json(tiny_model_dir, tmp_path, capsys):
    model = tiny_model_dir("qwen2")
    code, out, _ = _run(capsys, "eval", "--model", str(model), "--groups", "1-2,3-4", "--bypass", "1",
                        "--seq-len", "32", "--max-chunks", "3", "--json")
    assert code == 0
    result = json.loads(out)
    assert set(result["original"]) >= {"ppl"} and set(result["cqil"]) >= {"ppl", "kl", "top1"}
    assert result["plan"]["groups"][1] == [1, 2] and result["tokens"] == 3 * 32
    assert result["cqil"]["kl"] > 0


def test_eval_refuses_a_plan_for_another_model(tiny_model_dir, tmp_path, capsys):
    _run(capsys, "plan", "--model", str(tiny_model_dir("llama", 8)), "--uniform", "1:5:2",
         "--out", str(tmp_path / "plan.json"))
    code, _, err = _run(capsys, "eval", "--model", str(tiny_model_dir("llama")), "--plan", str(tmp_path / "plan.json"))
    assert code == 2 and "covers 8 layers but the model has 6" in err


def test_eval_without_plan_says_how_to_give_one(tiny_model_dir, capsys):
    code, _, err = _run(capsys, "eval", "--model", str(tiny_model_dir("llama")))
    assert code == 2 and "--uniform S:E:P" in err and len(err.strip().splitlines()) == 1


def test_analyze_writes_json_and_png(tiny_model_dir, tmp_path, capsys):
    out_dir = tmp_path / "analysis"
    code, out, _ = _run(capsys, "analyze", "--model", str(tiny_model_dir("llama")), "--seq-len", "32",
                        "--max-chunks", "4", "--out", str(out_dir))
    assert code == 0 and "0-1" in out
    report = json.loads((out_dir / "similarity.json").read_text())
    assert len(report["adjacent"]) == 5 and report["tokens"] == 4 * 32
    assert (out_dir / "similarity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["analysis"]  # no temporary left behind


def test_generate_cqil_plan(tiny_model_dir, capsys):
    code, out, _ = _run(capsys, "generate", "--model", str(tiny_model_dir("llama")), "--uniform", "1:5:2",
                        "--prompt", "def main", "--prompt", "class", "--max-new-tokens", "4", "--raw")
    assert code == 0 and out.count("> ") == 2


def test_console_script_error_is_one_line_without_traceback(tmp_path):
    cmd = [sys.executable, "-m", "cqil", "eval", "--model", str(tmp_path / "missing")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"cqil eval: error: model '{tmp_path / 'missing'}' does not exist: pass an HF model directory, "
        "a .gguf file, or leave --model out for the default SmolLM2-135M-Instruct"
    ]


def test_debug_shows_the_traceback(tmp_path):
    cmd = [sys.executable, "-m", "cqil", "--debug", "plan", "--model", str(tmp_path / "missing")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" in result.stderr and "CqilError" in result.stderr
