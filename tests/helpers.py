"""Tiny random LLaMA-family checkpoints (with a real tokenizer): the fast tests' library (fixtures: conftest.py)."""

from __future__ import annotations

from pathlib import Path

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
    from cqil.pipeline.data import default_text
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([default_text()[:200_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="</s>")


# -- a tiny `cqil build` ------------------------------------------------------------------------------------

# Small enough for seconds per stage on a tiny model, every stage still doing its real work.
SMALL = ["--set", "data.seq_len=32", "--set", "analyze.max_chunks=4", "--set", "recover.steps=4",
         "--set", "recover.seq_len=32", "--set", "validate.chunks=2", "--set", "validate.quality_chunks=4",
         "--set", "bench.seq=8", "--set", "bench.past=8", "--set", "bench.repeats=3", "--set", "bench.decode_repeats=5",
         "--set", "plan.uniform=\"1:5:2\"", "--set", "engines.opt_seq=16", "--set", "engines.max_seq=32",
         "--set", "engines.opt_past=16", "--set", "engines.max_context=64"]

# Files that carry wall-clock measurements, so two builds cannot share their bytes.
TIMED = {("recover", "adapter/training_run.json"), ("bench", "latency.json"), ("bench", "latency.png")}


# The torch thread count of the `built` reference build, for another process that must give its bytes.
BUILD_THREADS = {"OMP_NUM_THREADS": "1"}


def build_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["build", "--model", str(model), "--out", str(out), *SMALL, *extra]


def original_on_default_text(model_dir: Path, layers: int, seq_len: int):
    """(loaded model, its original CqilModel, the default text's split): what the plan-search tests start from."""
    from cqil.model.cqil import CqilModel
    from cqil.model.plan import identity_plan
    from cqil.pipeline.data import load_split
    from cqil.pipeline.sources import load_model

    loaded = load_model(model_dir)
    return loaded, CqilModel(loaded.model, identity_plan(layers)), load_split(loaded.tokenizer, seq_len=seq_len)

