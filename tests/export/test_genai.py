"""ONNX Runtime GenAI runs an exported folder as it is: its Generator gives `cqil generate`'s greedy tokens.

Also: genai_config.json names exactly the graph's inputs and outputs, and the tokenizer files load
under transformers (not naming the 5.x-only TokenizersBackend class) and with GenAI's own tokenizer.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from cqil.engines.genai import GenaiModel
from cqil.export.genai_config import GENAI_CONFIG_FILE, genai_config
from cqil.export.tokenizer_files import portable_tokenizer_config
from cqil.model.cqil import CqilModel
from cqil.model.errors import CqilError
from cqil.model.plan import Plan, identity_plan, uniform_plan
from cqil.model.steps import greedy_generate
from cqil.pipeline.cli import main
from cqil.pipeline.sources import load_model

from tests.helpers import tiny_config

PROMPTS = ("The object model of Python", "Lambda expressions", "A for statement iterates over")
NEW_TOKENS = 12
CQIL_PLAN = Plan(((0,), (1, 2, 3)), bypass=1)  # the tiny_cqil_onnx fixture: --groups 1-3 --bypass 1


@pytest.fixture(scope="module")
def original_onnx(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("genai-original") / "onnx"
    assert main(["export", "--model", str(tiny_model_dir("llama", 4)), "--original", "--out", str(out)]) == 0
    return out


def until_eos(row: list[int], eos: int) -> list[int]:
    return row[:row.index(eos) + 1] if eos in row else row


def reference_tokens(model_dir, plan: Plan, prompts: list[list[int]]) -> list[list[int]]:
    """What `cqil generate` computes: greedy_generate on the PyTorch CqilModel, left-padded batch."""
    loaded = load_model(str(model_dir))
    model = CqilModel(loaded.model, plan)
    longest = max(len(p) for p in prompts)
    pad = loaded.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    eos = loaded.tokenizer.eos_token_id
    return [until_eos(row, eos) for row in greedy_generate(model, ids, mask, NEW_TOKENS, eos).tolist()]


@pytest.mark.parametrize("which", ["original", "cqil"])
def test_genai_generator_gives_the_greedy_tokens_of_cqil_generate(which, original_onnx, tiny_cqil_onnx, tokenizer):
    model_dir, cqil_onnx = tiny_cqil_onnx
    folder, plan = (original_onnx, identity_plan(4)) if which == "original" else (cqil_onnx, CQIL_PLAN)
    prompts = [tokenizer.encode(text, add_special_tokens=False) for text in PROMPTS]
    assert len({len(p) for p in prompts}) > 1  # ragged: the batch is left-padded
    expected = reference_tokens(model_dir, plan, prompts)
    assert len({t for row in expected for t in row}) > 3  # not one repeated token: the comparison can fail

    genai = GenaiModel(folder)
    for prompt, want in zip(prompts, expected):
        assert genai.greedy([prompt], NEW_TOKENS) == [want]
    assert genai.greedy(prompts, NEW_TOKENS) == expected


def test_the_cqil_export_is_not_the_original_under_genai(original_onnx, tiny_cqil_onnx, tokenizer):
    """The plan reaches the runtime: the same prompts give other tokens through the two folders."""
    prompts = [tokenizer.encode(text, add_special_tokens=False) for text in PROMPTS]
    assert GenaiModel(original_onnx).greedy(prompts, NEW_TOKENS) != GenaiModel(tiny_cqil_onnx[1]).greedy(
        prompts, NEW_TOKENS)


def test_genai_config_names_the_graph_inputs_and_outputs(tiny_cqil_onnx):
    folder = tiny_cqil_onnx[1]
    settings = json.loads((folder / GENAI_CONFIG_FILE).read_text())
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    decoder = settings["model"]["decoder"]
    layers = decoder["num_hidden_layers"]
    named_inputs = [decoder["inputs"][k] for k in ("input_ids", "attention_mask", "position_ids")]
    named_inputs += [decoder["inputs"][kind] % i for i in range(layers)
                     for kind in ("past_key_names", "past_value_names")]
    named_outputs = [decoder["outputs"]["logits"]]
    named_outputs += [decoder["outputs"][kind] % i for i in range(layers)
                      for kind in ("present_key_names", "present_value_names")]
    assert named_inputs == [v.name for v in graph.input]
    assert named_outputs == [v.name for v in graph.output]
    config = json.loads((folder / "config.json").read_text())
    past = next(v for v in graph.input if v.name == named_inputs[3]).type.tensor_type.shape.dim
    assert decoder["num_key_value_heads"] == config["num_key_value_heads"] == past[1].dim_value
    assert decoder["head_size"] == past[3].dim_value
    assert settings["model"]["type"] == "llama" and settings["model"]["eos_token_id"] == config["eos_token_id"]
    assert settings["search"]["past_present_share_buffer"] is False  # presents are past + seq long


def test_genai_config_for_each_family_and_a_refusal():
    qwen = genai_config(tiny_config("qwen2", layers=3, head_dim=24))
    assert qwen["model"]["type"] == "qwen2" and qwen["model"]["decoder"]["head_size"] == 24
    assert qwen["model"]["context_length"] == qwen["search"]["max_length"] == 512
    assert genai_config(tiny_config("mistral"))["model"]["type"] == "mistral"
    other = tiny_config("llama")
    other.model_type = "gpt2"
    with pytest.raises(CqilError, match="model type 'gpt2' has no ONNX Runtime GenAI type"):
        genai_config(other)


def test_exported_tokenizer_loads_with_transformers_and_genai(tiny_cqil_onnx, tokenizer):
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    folder = tiny_cqil_onnx[1]
    saved = json.loads((folder / "tokenizer_config.json").read_text())
    assert saved["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert saved["model_input_names"] == ["input_ids", "attention_mask"]  # 4.x would add token_type_ids
    assert "TokenizersBackend" not in (folder / "tokenizer_config.json").read_text()
    loaded = AutoTokenizer.from_pretrained(folder)
    genai_tokenizer = og.Tokenizer(GenaiModel(folder).model)
    for text in (*PROMPTS, "tabs\tand newlines\n, unicode: é ü 中"):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert loaded.encode(text, add_special_tokens=False) == ids
        assert genai_tokenizer.encode(text).tolist() == ids
        assert genai_tokenizer.decode(ids) == loaded.decode(ids)
    assert (loaded.eos_token, loaded.pad_token) == (tokenizer.eos_token, tokenizer.pad_token)


def test_portable_tokenizer_config_rewrites_only_what_4x_cannot_read():
    v5 = {"tokenizer_class": "TokenizersBackend", "backend": "tokenizers", "is_local": True,
          "local_files_only": False, "extra_special_tokens": ["<tool>", "<end>"], "eos_token": "</s>"}
    portable = portable_tokenizer_config(v5, has_tokenizer_json=True, model_input_names=["input_ids", "attention_mask"])
    assert portable == {"tokenizer_class": "PreTrainedTokenizerFast", "backend": "tokenizers",
                        "additional_special_tokens": ["<tool>", "<end>"], "eos_token": "</s>",
                        "model_input_names": ["input_ids", "attention_mask"]}
    named = {"tokenizer_class": "Qwen2Tokenizer", "extra_special_tokens": {"image_token": "<img>"}}
    assert portable_tokenizer_config(named, has_tokenizer_json=True) == named  # 4.x reads both as they are
    assert portable_tokenizer_config(v5, has_tokenizer_json=False)["tokenizer_class"] == "TokenizersBackend"


# -- the default model (slow): its CQIL export under ONNX Runtime GenAI and under Optimum ----------------

CHAT = ("What is Python?", "Explain a for loop in one sentence.")


@pytest.fixture(scope="module")
def default_cqil_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("default-cqil") / "onnx"
    assert main(["export", "--uniform", "15:30:2", "--bypass", "1", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_genai_runs_the_default_cqil_export_as_cqil_generate(default_cqil_export):
    import onnxruntime_genai as og

    loaded = load_model(None)
    tokenizer = loaded.tokenizer
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": m}], tokenize=False, add_generation_prompt=True)
             for m in CHAT]
    prompts = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    model = CqilModel(loaded.model, uniform_plan(15, 30, 2, 30, bypass=1))
    expected = []
    for prompt in prompts:  # one at a time, as `cqil generate --prompt` does
        ids = torch.tensor([prompt])
        row = greedy_generate(model, ids, torch.ones_like(ids), 20, tokenizer.eos_token_id)[0].tolist()
        expected.append(until_eos(row, tokenizer.eos_token_id))
    genai = GenaiModel(default_cqil_export, threads=2)
    genai_tokenizer = og.Tokenizer(genai.model)
    assert [genai_tokenizer.encode(t).tolist() for t in texts] == prompts
    chat = json.dumps([{"role": "user", "content": CHAT[0]}])
    assert genai_tokenizer.apply_chat_template(chat, add_generation_prompt=True) == texts[0]  # chat_template.jinja
    assert genai.greedy(prompts, 20) == expected


@pytest.mark.slow
def test_optimum_loads_the_default_cqil_export_with_its_tokenizer(default_cqil_export):
    """scripts/check_optimum.py: Optimum (transformers 4.x, its own virtualenv) gives our greedy tokens."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "check_optimum.py"
    result = subprocess.run([sys.executable, str(script), str(default_cqil_export), "--max-new-tokens", "16"],
                            capture_output=True, text=True, timeout=1800)
    print(result.stdout, result.stderr[-2000:])
    assert result.returncode == 0
    assert "transformers 4." in result.stdout and "PreTrainedTokenizerFast" in result.stdout
    assert result.stdout.count("new tokens same") == 2 and "DIFFER" not in result.stdout


def test_end_of_text_comes_from_generation_config_first():
    """Chat models end a turn on a token that only generation_config.json names (SmolLM2: <|im_end|>)."""
    from cqil.export.genai_config import genai_config
    from transformers import GenerationConfig

    from tests.helpers import tiny_config

    config = tiny_config("llama", 2)  # eos 2, pad 2
    assert genai_config(config)["model"]["eos_token_id"] == 2
    settings = genai_config(config, GenerationConfig(eos_token_id=[2, 7], pad_token_id=5))
    assert settings["model"]["eos_token_id"] == [2, 7] and settings["model"]["pad_token_id"] == 5
    unset = genai_config(config, GenerationConfig(max_length=9))  # names no ids: config.json's stand
    assert unset["model"]["eos_token_id"] == 2 and unset["model"]["pad_token_id"] == 2
