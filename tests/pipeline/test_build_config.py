"""The default build configuration: an automatic plan unless an explicit one is asked for."""

from __future__ import annotations

import pytest
from cqil.model.errors import CqilError
from cqil.pipeline.autoplan import SearchRequest, parse_bypass_choices
from cqil.pipeline.build_config import load_config


def test_the_default_configuration_resolves_to_an_automatic_plan_of_depth_23():
    plan = load_config()["plan"]
    assert plan["auto"] is True and plan["target_depth"] == 23
    assert not any(plan[key] for key in ("uniform", "groups", "file", "max_kl"))
    request = SearchRequest(plan["target_depth"] or None, plan["max_kl"] or None, plan["max_group_size"],
                            parse_bypass_choices(plan["bypass_choices"]), head_every=plan["head_every"])
    request.check(30)  # SmolLM2-135M, the default model
    with pytest.raises(CqilError, match="--target-depth 23 is impossible for 6 layers"):
        request.check(6)


def test_an_explicit_plan_is_one_override_away(tmp_path):
    assert load_config(overrides=['plan.uniform="15:30:2"'])["plan"]["auto"] is False
    assert load_config(overrides=['plan.groups="3-4"'])["plan"]["auto"] is False
    (tmp_path / "b.toml").write_text('[plan]\nuniform = "15:30:2"\n')
    assert load_config(tmp_path / "b.toml")["plan"]["auto"] is False
    both = load_config(overrides=['plan.uniform="15:30:2"', "plan.auto=true"])["plan"]  # the user asked for both
    assert both["auto"] is True and both["uniform"] == "15:30:2"


def test_a_kl_budget_replaces_the_default_depth():
    plan = load_config(overrides=["plan.max_kl=0.3"])["plan"]
    assert (plan["auto"], plan["target_depth"], plan["max_kl"]) == (True, 0, 0.3)
    plan = load_config(overrides=["plan.max_kl=0.3", "plan.target_depth=20"])["plan"]
    assert (plan["target_depth"], plan["max_kl"]) == (20, 0.3)  # both given: the plan stage refuses it
