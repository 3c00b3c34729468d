"""Model sources: supported checkpoints load, everything else is refused with one clear line."""

from __future__ import annotations

import shutil

import pytest
from cqil.model.errors import CqilError
from cqil.pipeline.sources import load_model, resolve_model_dir

from tests.helpers import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_directory_loads(tiny_model_dir, family):
    loaded = load_model(tiny_model_dir(family))
    assert loaded.model.config.model_type == family
    assert loaded.tokenizer("def f").input_ids
    assert not loaded.model.training


def _save_foreign(tmp_path, kind):
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    else:
        model = BertModel(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=50))
    model.save_pretrained(tmp_path / kind)
    return tmp_path / kind


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_other_architectures_are_refused(tmp_path, kind):
    with pytest.raises(CqilError, match=f"is a '{kind}' model; CQIL here supports LLaMA-family"):
        resolve_model_dir(_save_foreign(tmp_path, kind))


def test_missing_path(tmp_path):
    with pytest.raises(CqilError, match="does not exist"):
        resolve_model_dir(tmp_path / "nowhere")


def test_directory_without_config(tmp_path):
    with pytest.raises(CqilError, match="no config.json"):
        resolve_model_dir(tmp_path)


def test_config_without_weights(tmp_path, tiny_model_dir):
    shutil.copy(tiny_model_dir("llama") / "config.json", tmp_path / "config.json")
    with pytest.raises(CqilError, match="no weights"):
        resolve_model_dir(tmp_path)


def test_corrupt_weights(tmp_path, tiny_model_dir):
    copy = shutil.copytree(tiny_model_dir("llama"), tmp_path / "m")
    (copy / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CqilError, match="could not load the weights"):
        load_model(copy)


def test_corrupt_config(tmp_path, tiny_model_dir):
    copy = shutil.copytree(tiny_model_dir("llama"), tmp_path / "m")
    (copy / "config.json").write_text("{oops")
    with pytest.raises(CqilError, match="not valid JSON"):
        resolve_model_dir(copy)


def test_corrupt_gguf(tmp_path, cache_env):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + b"\x01" * 64)
    with pytest.raises(CqilError, match="could not be read as GGUF"):
        resolve_model_dir(bad)
    assert not any(cache_env.rglob("*.safetensors"))  # nothing half-written


def test_non_gguf_file(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"1234")
    with pytest.raises(CqilError, match="not a .gguf file"):
        resolve_model_dir(tmp_path / "weights.bin")
