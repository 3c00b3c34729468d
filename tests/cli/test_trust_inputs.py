"""Issue 21's smaller inputs: positions beyond the model's context, an adapter distilled for another plan,
a dangling-symlink --out. Each is one line; bad input exits 2 before any work."""

from __future__ import annotations

import pytest
from cqil.pipeline.cli import main


def run(capsys, argv: list[str]) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(argv)
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    return code, [line for line in lines if line.strip() and "%|" not in line and not line.strip() == "\x1b[A"]


def test_generate_past_the_models_positions_is_refused(tiny_model_dir, capsys):
    model = str(tiny_model_dir("llama", 2))  # max_position_embeddings 512; "A" is one token
    code, err = run(capsys, ["generate", "--model", model, "--prompt", "A", "--max-new-tokens", "512"])
    assert code == 2 and err == ["cqil generate: error: the prompt (1 tokens) plus --max-new-tokens 512 exceeds "
                                 "the model's context of 512 tokens: shorten one of them"]
    code, err = run(capsys, ["generate", "--model", model, "--ranks", "2", "--groups", "0-1", "--prompt", "A",
                             "--max-new-tokens", "512"])
    assert code == 2 and len(err) == 1 and "exceeds the model's context of 512 tokens" in err[0]
    assert run(capsys, ["generate", "--model", model, "--prompt", "A", "--max-new-tokens", "2"])[0] == 0


def test_eval_past_the_models_positions_is_refused(tiny_model_dir, capsys):
    code, err = run(capsys, ["eval", "--model", str(tiny_model_dir("llama", 2)), "--groups", "0-1",
                             "--seq-len", "513"])
    assert code == 2 and err == ["cqil eval: error: --seq-len 513 exceeds the model's context of 512 tokens: "
                                 "use at most 512"]


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    model = tiny_model_dir("llama", 4)
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    assert main(["finetune", "--model", str(model), "--groups", "0-1", "--bypass", "1", "--steps", "1",
                 "--seq-len", "16", "--max-chunks", "4", "--eval-chunks", "1", "--rank", "2", "--out", str(out)]) == 0
    return model, out


def test_an_adapter_for_another_plan_warns_and_strict_refuses(adapter, tmp_path, capsys):
    model, out = adapter
    base = ["--model", str(model), "--adapter", str(out)]
    eval_args = ["eval", *base, "--seq-len", "16", "--max-chunks", "1"]
    code, err = run(capsys, [*eval_args, "--groups", "2-3", "--bypass", "1"])
    assert code == 0 and len(err) == 1 and err[0].startswith(f"warning: adapter '{out}' was distilled for the plan")
    code, err = run(capsys, [*eval_args, "--groups", "2-3", "--bypass", "1", "--strict"])
    assert code == 2 and len(err) == 1 and "(--strict)" in err[0]
    code, err = run(capsys, ["merge", *base, "--groups", "2-3", "--strict", "--out", str(tmp_path / "m")])
    assert code == 2 and "(--strict)" in err[0] and not (tmp_path / "m").exists()
    code, err = run(capsys, [*eval_args, "--strict"])  # its own plan: nothing to say
    assert code == 0 and err == []


def test_a_dangling_symlink_out_is_refused_while_parsing(tiny_model_dir, tmp_path, capsys):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "nowhere")
    code, err = run(capsys, ["export", "--model", str(tiny_model_dir("llama", 2)), "--groups", "0-1",
                             "--out", str(link)])
    assert code == 2 and err == [f"cqil export: error: --out '{link}' is a symbolic link to '{tmp_path / 'nowhere'}', "
                                 "which does not exist: create its target folder, or give another folder"]
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()
