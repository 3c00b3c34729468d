"""`cqil export` refuses bad inputs with one clear line, before any slow work, and writes nothing."""

from __future__ import annotations

import pytest
import torch
from cqil.export.writer import export_model
from cqil.model.cqil import CqilModel
from cqil.model.errors import CqilError
from cqil.model.plan import identity_plan
from cqil.pipeline.cli import main

from tests.helpers import tiny_model


def export_error(capsys, *argv: str) -> str:
    capsys.readouterr()  # drop what making the checkpoint printed
    assert main(["export", *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cqil export: error: ")
    return lines[0]


def test_model_without_plan_needs_one(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "onnx"
    message = export_error(capsys, "--model", str(tiny_model_dir("llama", 2)), "--out", str(out))
    assert "no plan" in message and "--original" in message and "--uniform" in message
    assert not out.exists()


def test_original_excludes_a_plan(tiny_model_dir, tmp_path, capsys):
    message = export_error(capsys, "--model", str(tiny_model_dir("llama", 2)), "--original",
                           "--groups", "0-1", "--out", str(tmp_path / "onnx"))
    assert "--original" in message and "--groups" in message


@pytest.mark.parametrize("precision", ["bf16", "int3", "float32"])
def test_unsupported_precision(precision, tiny_model_dir, tmp_path, capsys):
    message = export_error(capsys, "--model", str(tiny_model_dir("llama", 2)), "--original",
                           "--precision", precision, "--out", str(tmp_path / "onnx"))
    assert f"--precision {precision} must be one of fp32, fp16, int8, int4" in message  # refused while parsing
    assert list(tmp_path.iterdir()) == []


def test_old_dtype_spelling_names_precision(tiny_model_dir, tmp_path, capsys):
    message = export_error(capsys, "--model", str(tiny_model_dir("llama", 2)), "--original",
                           "--dtype", "fp16", "--out", str(tmp_path / "onnx"))
    assert "--dtype is now --precision" in message and "--precision fp16" in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("block", ["24", "8"])
def test_block_size_must_suit_matmulnbits(block, tiny_model_dir, tmp_path, capsys):
    message = export_error(capsys, "--model", str(tiny_model_dir("llama", 2)), "--original", "--precision", "int4",
                           "--block-size", block, "--out", str(tmp_path / "onnx"))
    assert f"--block-size {block}" in message and "power of two" in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("options", "expected"), [
    (["--int4-method", "awq"], "--int4-method awq must be one of rtn, hqq"),
    (["--int8-matmuls", "lm_head,mlp"], "--int8-matmuls: unknown matmul 'mlp'"),
    (["--accuracy-level", "5"], "--accuracy-level 5 is not a MatMulNBits accuracy level"),
])
def test_bad_quantization_settings(options, expected, tiny_model_dir, tmp_path, capsys):
    message = export_error(capsys, "--model", str(tiny_model_dir("llama", 2)), "--original", "--precision", "int4",
                           *options, "--out", str(tmp_path / "onnx"))
    assert expected in message
    assert list(tmp_path.iterdir()) == []


def test_onnxruntime_target_at_fp16_is_refused(tiny_model_dir, tmp_path, capsys):
    """The builder's fp16 graph fails at its first CPU run (in ORT, GenAI and Optimum): refused before exporting."""
    message = export_error(capsys, "--model", str(tiny_model_dir("llama", 2)), "--original", "--target", "onnxruntime",
                           "--precision", "fp16", "--out", str(tmp_path / "onnx"))
    assert "--target onnxruntime --precision fp16" in message and "use --precision fp32, int8, int4" in message
    assert "--target portable --precision fp16" in message
    assert list(tmp_path.iterdir()) == []


def test_unknown_layout(tiny_model_dir, tmp_path, capsys):
    message = export_error(capsys, "--model", str(tiny_model_dir("llama", 2)), "--original",
                           "--layout", "wide", "--out", str(tmp_path / "onnx"))
    assert "--layout wide must be one of branches, fused" in message


def test_unwritable_output(tiny_model_dir, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    message = export_error(capsys, "--model", str(tiny_model_dir("llama", 2)), "--original",
                           "--out", str(blocker / "onnx"))
    assert "cannot write to" in message and "choose another --out" in message
    message = export_error(capsys, "--model", str(tiny_model_dir("llama", 2)), "--original", "--out", str(blocker))
    assert "is a file" in message
    assert blocker.read_text() == "not a directory"


def test_api_refuses_bad_precision_before_exporting(tmp_path):
    model = CqilModel(tiny_model("llama", 2), identity_plan(2))
    with pytest.raises(CqilError, match="unknown precision 'float64'"):
        export_model(model, tmp_path / "onnx", precision="float64")
    assert not (tmp_path / "onnx").exists()
    assert model.hf.model.embed_tokens.weight.dtype == torch.float32


def test_onnxruntime_target_refuses_a_sliding_window(tmp_path, tokenizer, capsys):
    model_dir = tmp_path / "mistral"
    tiny_model("mistral", 2, sliding_window=5).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    message = export_error(capsys, "--model", str(model_dir), "--original", "--target", "onnxruntime",
                           "--out", str(tmp_path / "onnx"))
    assert "sliding window (5)" in message and "--target portable" in message
    assert not (tmp_path / "onnx").exists()
