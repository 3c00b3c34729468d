"""Loading peft LoRA adapters: ours and official-style ones apply; adapters of other models are refused early."""

from __future__ import annotations

import json

import pytest
import torch
from cqil.model.cqil import CqilModel
from cqil.model.errors import CqilError
from cqil.model.plan import uniform_plan
from cqil.pipeline.adapters import DEFAULT_TARGETS, load_adapter, validate_adapter
from safetensors.torch import save_file

from tests.helpers import tiny_model

RANK, ALPHA = 4, 8
PLAN = uniform_plan(1, 5, 2, 6, bypass=1)


def official_config(targets: list[str]) -> dict:
    """An adapter_config.json as the official CQIL repository ships them (older peft, full module names)."""
    return {"alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": "models/LLaMA-7B",
            "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
            "layers_pattern": None, "layers_to_transform": None, "lora_alpha": ALPHA, "lora_dropout": 0.0,
            "modules_to_save": None, "peft_type": "LORA", "r": RANK, "rank_pattern": {}, "revision": None,
            "target_modules": targets, "task_type": "CAUSAL_LM"}


def random_lora(model: torch.nn.Module, modules: list[str], seed: int = 0) -> dict[str, torch.Tensor]:
    """LoRA pairs for `modules` of `model`, named as peft saves them."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name in modules:
        linear = model.get_submodule(name)
        weights[f"base_model.model.{name}.lora_A.weight"] = torch.randn(RANK, linear.in_features, generator=generator) * 0.1
        weights[f"base_model.model.{name}.lora_B.weight"] = torch.randn(linear.out_features, RANK, generator=generator) * 0.1
    return weights


def write_adapter(path, config: dict, weights: dict[str, torch.Tensor], binary: bool = False):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    if binary:
        torch.save(weights, path / "adapter_model.bin")
    else:
        save_file(weights, str(path / "adapter_model.safetensors"))
    return path


def every_projection(layers: int) -> list[str]:
    parent = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
              "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    return [f"model.layers.{i}.{parent[t]}.{t}" for i in range(layers) for t in DEFAULT_TARGETS]


def has_lora(model) -> bool:
    return any("lora" in name for name, _ in model.named_modules())


@pytest.mark.parametrize("binary", [False, True], ids=["safetensors", "bin"])
def test_official_style_adapter_with_full_module_names_applies_w_plus_scaled_ba(tmp_path, binary):
    modules = every_projection(6)
    weights = random_lora(tiny_model("llama", 6), modules)
    adapter = write_adapter(tmp_path / "official", official_config(modules), weights, binary)

    model = tiny_model("llama", 6)
    load_adapter(model, adapter)
    ids = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = CqilModel(model, PLAN)(ids)[0]
        expected_model = tiny_model("llama", 6)  # W + (alpha / r) B A, by hand
        for name in modules:
            a = weights[f"base_model.model.{name}.lora_A.weight"]
            b = weights[f"base_model.model.{name}.lora_B.weight"]
            expected_model.get_submodule(name).weight += (ALPHA / RANK) * b @ a
        expected = CqilModel(expected_model, PLAN)(ids)[0]
        plain = CqilModel(tiny_model("llama", 6), PLAN)(ids)[0]
    assert (got - expected).abs().max() <= 1e-4
    assert (got - plain).abs().max() > 1e-2


def test_adapter_with_short_target_names_loads(tmp_path):
    model = tiny_model("llama", 6)
    adapter = write_adapter(tmp_path / "a", official_config(list(DEFAULT_TARGETS)),
                            random_lora(model, every_projection(6)))
    validate_adapter(adapter, model)
    load_adapter(model, adapter)
    assert has_lora(model)


def test_adapter_for_another_hidden_size_is_refused_before_any_work(tmp_path):
    wider = tiny_model("llama", 6, hidden_size=96, intermediate_size=192)
    adapter = write_adapter(tmp_path / "a", official_config(list(DEFAULT_TARGETS)),
                            random_lora(wider, every_projection(6)))
    model = tiny_model("llama", 6)
    with pytest.raises(CqilError, match=r"does not fit this model: 'model\.layers\.0\.mlp\.down_proj' is 128->64"):
        load_adapter(model, adapter)
    assert not has_lora(model)


def test_adapter_with_modules_this_model_lacks_is_refused(tmp_path):
    weights = {"base_model.model.model.layers.0.attention.wq.lora_A.weight": torch.zeros(RANK, 64),
               "base_model.model.model.layers.0.attention.wq.lora_B.weight": torch.zeros(64, RANK)}
    adapter = write_adapter(tmp_path / "a", official_config(["wq"]), weights)
    model = tiny_model("llama", 6)
    with pytest.raises(CqilError, match=r"modules this model does not have: model\.layers\.0\.attention\.wq"):
        load_adapter(model, adapter)
    assert not has_lora(model)


@pytest.mark.parametrize("adapter_layers, model_layers, short_names", [(4, 6, True), (6, 4, False), (6, 4, True)])
def test_adapter_for_another_layer_count_is_refused(tmp_path, adapter_layers, model_layers, short_names):
    modules = every_projection(adapter_layers)
    targets = list(DEFAULT_TARGETS) if short_names else modules
    adapter = write_adapter(tmp_path / "a", official_config(targets),
                            random_lora(tiny_model("llama", adapter_layers), modules))
    model = tiny_model("llama", model_layers)
    with pytest.raises(CqilError, match=rf"another layer count: it has weights for layers 0\.\.{adapter_layers - 1}, "
                                        rf"this model has {model_layers} layers"):
        load_adapter(model, adapter)
    assert not has_lora(model)


def test_not_an_adapter_or_not_lora_is_refused(tmp_path):
    model = tiny_model("llama", 6)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CqilError, match="no adapter_config.json"):
        load_adapter(model, tmp_path / "empty")
    config = official_config(list(DEFAULT_TARGETS)) | {"peft_type": "IA3"}
    adapter = write_adapter(tmp_path / "ia3", config, random_lora(model, every_projection(6)))
    with pytest.raises(CqilError, match="only LoRA adapters"):
        load_adapter(model, adapter)
    incomplete = {k: v for k, v in random_lora(model, every_projection(6)).items() if "layers.2.mlp.up_proj.lora_B" not in k}
    adapter = write_adapter(tmp_path / "half", official_config(list(DEFAULT_TARGETS)), incomplete)
    with pytest.raises(CqilError, match="only lora_A for 'model.layers.2.mlp.up_proj'"):
        load_adapter(model, adapter)
    assert not has_lora(model)
