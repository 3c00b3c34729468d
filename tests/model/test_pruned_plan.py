"""Plans that drop layers: a pruned plan is the HF model rebuilt without those layers (prefill and cached
decode), hybrid plans keep the group rule, and the plan file refuses what makes no sense."""

from __future__ import annotations

import json

import pytest
import torch
from cqil.model.cqil import CqilModel
from cqil.model.errors import CqilError
from cqil.model.plan import Plan, from_parallel_groups, load_plan, plan_from_dict, pruned_plan
from cqil.model.steps import greedy_generate

from tests.helpers import FAMILIES, tiny_model

LAYERS = 6
DROPPED = [1, 4]


def hf_without(model, dropped: list[int]):
    """An HF model of the same family built with fewer layers, holding the kept layers' weights."""
    from transformers import AutoModelForCausalLM

    config = model.config.to_dict()
    kept = [i for i in range(model.config.num_hidden_layers) if i not in dropped]
    config["num_hidden_layers"] = len(kept)
    if config.get("layer_types"):
        config["layer_types"] = [config["layer_types"][i] for i in kept]
    smaller = AutoModelForCausalLM.from_config(type(model.config).from_dict(config), dtype=torch.float32).eval()
    state = {}
    for name, tensor in model.state_dict().items():
        if ".layers." in name:
            prefix, rest = name.split(".layers.", 1)
            index, tail = rest.split(".", 1)
            if int(index) in dropped:
                continue
            name = f"{prefix}.layers.{kept.index(int(index))}.{tail}"
        state[name] = tensor
    smaller.load_state_dict(state, strict=True)
    return smaller


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_plan_equals_hf_model_without_those_layers(family):
    model = tiny_model(family, LAYERS)
    reference = hf_without(model, DROPPED)
    cqil = CqilModel(model, pruned_plan(DROPPED, LAYERS))
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
        logits, presents = cqil(ids, mask)
    assert len(presents) == 2 * (LAYERS - len(DROPPED))  # cache entries only for kept layers
    real = mask.bool()
    assert (logits[real] - expected[real]).abs().max() <= 1e-4
    # cached decode: ours against HF generate on the rebuilt model
    new = greedy_generate(cqil, ids, mask, max_new_tokens=6)
    with torch.no_grad():
        hf_new = reference.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                    pad_token_id=2, eos_token_id=None, min_new_tokens=6)[:, ids.shape[1]:]
    assert new.tolist() == hf_new.tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_hybrid_plan_cached_decode_equals_recompute(family):
    model = tiny_model(family, LAYERS)
    plan = from_parallel_groups([[2, 3]], LAYERS, 1, dropped=(0, 5))
    cqil = CqilModel(model, plan)
    ids = torch.randint(3, model.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full, _ = cqil(ids, torch.ones_like(ids))
        _, past = cqil(ids[:, :7], torch.ones(1, 7, dtype=torch.long))
        step, _ = cqil(ids[:, 7:], torch.ones_like(ids), past_key_values=past)
    assert (step - full[:, 7:]).abs().max() <= 1e-4
    # the group of the hybrid plan is the design rule applied to the kept layers: equal to the
    # uniform plan on the rebuilt model whose layers 1-2 are the original 2-3
    smaller = CqilModel(hf_without(model, [0, 5]), from_parallel_groups([[1, 2]], 4, 1))
    with torch.no_grad():
        assert (smaller(ids, torch.ones_like(ids))[0] - full).abs().max() <= 1e-4


def test_plan_file_round_trip_and_old_format(tmp_path):
    plan = from_parallel_groups([[2, 3]], LAYERS, 1, {"model_type": "llama"}, dropped=(0, 5))
    path = tmp_path / "plan.json"
    plan.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "cqil-plan/2" and data["dropped"] == [0, 5] and data["num_layers"] == LAYERS
    again = load_plan(path, LAYERS)
    assert (again.groups, again.dropped, again.bypass) == (plan.groups, plan.dropped, 1)
    assert "dropped 0,5" in again.describe() and again.depth == 3 and not again.is_identity
    old = {"format": "cqil-plan/1", "groups": [[0], [1, 2], [3], [4], [5]], "bypass": 0}
    assert plan_from_dict(old, LAYERS).dropped == ()


@pytest.mark.parametrize("data, message", [
    ({"format": "cqil-plan/99", "groups": [[0], [1]]}, "plan format 'cqil-plan/99' is not one this cqil reads"),
    ({"groups": [], "dropped": [0, 1]}, "drops every layer"),
    ({"groups": [[0], [2]], "dropped": [1, 1]}, "drops layer 1 twice"),
    ({"groups": [[0], [1], [2]], "dropped": [1]}, "layer 1 is both dropped and in group [1]"),
    ({"groups": [[0], [1]], "dropped": [7]}, "dropped layer 7 is outside"),
    ({"groups": [[0]], "dropped": ["1"]}, "'dropped' must be a list of layer indices"),
])
def test_bad_plans_refused_with_one_line(data, message):
    with pytest.raises(CqilError) as info:
        plan_from_dict(data)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_pruned_plan_refuses_dropping_everything_or_outside():
    with pytest.raises(CqilError, match="drops every layer"):
        pruned_plan(list(range(LAYERS)), LAYERS)
    with pytest.raises(CqilError, match="outside 0..5"):
        pruned_plan([6], LAYERS)
    with pytest.raises(CqilError, match="drops layer 2 twice"):
        Plan(((0,), (1,)), 0, {}, (2, 2))
