"""Plans: parsing, the paper's uniform plans, the official form, validation errors, model fit."""

from __future__ import annotations

import json

import pytest
from cqil.model.errors import CqilError
from cqil.model.plan import (
    Plan,
    identity_plan,
    load_plan,
    model_record,
    parse_groups_spec,
    parse_uniform_spec,
    plan_from_dict,
)

from tests.helpers import tiny_config


def test_uniform_plan_as_in_the_paper():
    plan = parse_uniform_spec("12:30:2", 32, bypass=1)
    assert plan.groups[:12] == tuple((i,) for i in range(12))
    assert plan.groups[12:21] == tuple((i, i + 1) for i in range(12, 30, 2))
    assert plan.groups[21:] == ((30,), (31,))
    assert plan.depth == 23 and plan.bypass == 1 and plan.num_layers == 32


def test_uniform_plan_last_group_smaller():
    plan = parse_uniform_spec("15:30:2", 30)
    assert plan.groups[-2:] == ((27, 28), (29,))
    plan = parse_uniform_spec("14:30:4", 32)
    assert plan.groups[14:18] == ((14, 15, 16, 17), (18, 19, 20, 21), (22, 23, 24, 25), (26, 27, 28, 29))


def test_explicit_groups_fill_in_single_layers():
    plan = parse_groups_spec("2-3, 5-7", 10, bypass=2)
    assert plan.groups == ((0,), (1,), (2, 3), (4,), (5, 6, 7), (8,), (9,))
    assert plan.describe() == "depth 7/10, bypass d=2, parallel groups 2-3,5-7"


def test_official_form_reads_cqil_layers_and_d():
    plan = plan_from_dict({"cqil_layers": [[12, 13], [14, 15]], "d": 1}, 16)
    assert plan.groups[12:] == ((12, 13), (14, 15)) and plan.bypass == 1


def test_json_round_trip(tmp_path):
    plan = parse_uniform_spec("1:5:2", 6, 1, model_record(tiny_config()))
    plan.save(tmp_path / "plan.json")
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["groups"][1] == [1, 2] and data["bypass"] == 1 and data["model"]["model_type"] == "llama"
    assert load_plan(tmp_path / "plan.json") == plan


@pytest.mark.parametrize("spec,message", [
    ("3-5,5-6", "layer 5 is in two groups"),
    ("8-10", "outside 0..9"),
    ("4-2", "runs backwards"),
    ("a-b", "not 'A-B'"),
    ("", "--groups is empty"),
])
def test_group_spec_errors(spec, message):
    with pytest.raises(CqilError, match=message):
        parse_groups_spec(spec, 10)


@pytest.mark.parametrize("spec,message", [
    ("5:3:2", "0 <= S < E <= 10"),
    ("0:11:2", "0 <= S < E <= 10"),
    ("2:4:3", "larger than the span"),
    ("2:8:0", "at least 1"),
    ("2:8", "S:E:P"),
])
def test_uniform_spec_errors(spec, message):
    with pytest.raises(CqilError, match=message):
        parse_uniform_spec(spec, 10)


def test_bypass_must_fit_the_groups():
    with pytest.raises(CqilError, match="--bypass 0..1"):
        parse_uniform_spec("2:6:2", 10, bypass=2)
    with pytest.raises(CqilError, match="non-negative"):
        plan_from_dict({"groups": [[0], [1]], "bypass": -1})


@pytest.mark.parametrize("groups,message", [
    ([[0], [2], [1]], "expected layer 1, found 2"),
    ([[0, 2], [1]], "expected layer 1, found 2"),
    ([[0], []], "empty"),
    ([[0], [1], [1]], "expected layer 2, found 1"),
])
def test_groups_must_cover_every_layer_once_in_order(groups, message):
    with pytest.raises(CqilError, match=message):
        Plan(tuple(map(tuple, groups)))


def test_official_form_rejects_non_consecutive_group():
    with pytest.raises(CqilError, match="not a run of consecutive layers"):
        plan_from_dict({"cqil_layers": [[3, 5]], "d": 0}, 8)


def test_plan_refuses_a_model_it_does_not_fit():
    plan = parse_uniform_spec("1:5:2", 6, 0, model_record(tiny_config("llama", 6)))
    plan.check_fits(tiny_config("llama", 6))
    with pytest.raises(CqilError, match="covers 6 layers but the model has 8"):
        plan.check_fits(tiny_config("llama", 8))
    with pytest.raises(CqilError, match="made for a 'llama' model, not 'qwen2'"):
        plan.check_fits(tiny_config("qwen2", 6))
    with pytest.raises(CqilError, match="hidden size 64"):
        plan.check_fits(tiny_config("llama", 6, hidden_size=32, intermediate_size=64))
    with pytest.raises(CqilError, match="covers 3 layers but the model has 6"):
        plan_from_dict({"groups": [[0], [1, 2]]}, 6)


def test_load_plan_errors(tmp_path):
    with pytest.raises(CqilError, match="does not exist"):
        load_plan(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CqilError, match="not valid JSON"):
        load_plan(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"layers": 3}')
    with pytest.raises(CqilError, match="not a plan"):
        load_plan(tmp_path / "other.json")


def test_identity_plan_is_the_original_model():
    plan = identity_plan(4)
    assert plan.is_identity and plan.depth == 4 and plan.max_group_size == 1
