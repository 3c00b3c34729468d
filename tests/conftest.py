"""Tiny random LLaMA-family checkpoints (with a real tokenizer) for the fast tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

FAMILIES = ("llama", "mistral", "qwen2")
TINY_VOCAB = 384


def tiny_config(family: str = "llama", layers: int = 6, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
    kwargs = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=TINY_VOCAB, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=family == "llama")
    kwargs.update(overrides)
    return cls(**kwargs)


def tiny_model(family: str = "llama", layers: int = 6, seed: int = 0, **overrides):
    """A random model in eval mode; weights scaled up a little so layers differ visibly."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, layers, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0, 0.08)
    return model.eval()


def tiny_tokenizer():
    """A byte-level BPE trained on a slice of the default text: real tokenization, offline, in ~1 s."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from pipeline.data import default_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([default_text()[:200_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="</s>")


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """Factory: save a tiny checkpoint of `family` once per session and return its directory."""
    made: dict[tuple, Path] = {}

    def make(family: str = "llama", layers: int = 6) -> Path:
        key = (family, layers)
        if key not in made:
            path = tmp_path_factory.mktemp(f"tiny-{family}-{layers}")
            tiny_model(family, layers).save_pretrained(path)
            tokenizer.save_pretrained(path)
            made[key] = path
        return made[key]

    return make


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for a module of tiny matmuls: on the loaded, shared 2-core machine two
    threads fighting make them ~100x slower (measured: 20 ms -> 3-6 s per tiny prefill + decode)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    """An empty, private CQIL cache."""
    monkeypatch.setenv("CQIL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def tiny_cqil_onnx(tmp_path_factory, tiny_model_dir):
    """One `cqil export` of a tiny 4-layer llama under groups 1-3, d=1 (branches): (model dir, onnx dir).

    Shared by the engine tests (runner, validate, bench): a tiny export takes 10-30 s here.
    """
    from pipeline.cli import main

    model_dir = tiny_model_dir("llama", 4)
    out = tmp_path_factory.mktemp("cqil-onnx") / "onnx"
    assert main(["export", "--model", str(model_dir), "--groups", "1-3", "--bypass", "1", "--out", str(out)]) == 0
    return model_dir, out
