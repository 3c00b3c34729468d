"""Automatic plans on a tiny random model: scoring, the DP against brute force, verification, CLI."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from cqil.model.cqil import CqilModel
from cqil.model.errors import CqilError
from cqil.model.plan import (
    Plan,
    from_parallel_groups,
    identity_plan,
    load_plan,
    model_record,
)
from cqil.pipeline.autoplan import (
    Candidate,
    Choice,
    SearchRequest,
    best_by_depth,
    calibration_kl,
    group_costs,
    parse_bypass_choices,
    predicted_kl,
    repair,
    score_candidates,
    search,
    select,
)
from cqil.pipeline.cli import main
from cqil.pipeline.data import load_split
from cqil.pipeline.quality import evaluate

from tests.helpers import original_on_default_text

LAYERS = 6
SEQ = 32


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    loaded, original, split = original_on_default_text(tiny_model_dir("llama", LAYERS), LAYERS, SEQ)
    return original, split.train[:4], split.held_out[:6], model_record(loaded.model.config)


@pytest.fixture(scope="module")
def candidates(setup):
    original, calibration, _, _ = setup
    return score_candidates(original, calibration, 3, (0, 1, 2), progress=False)


def compositions(layers: int, max_size: int):
    """Every partition of 0..layers-1 into consecutive groups of at most max_size (brute force)."""
    if layers == 0:
        yield ()
        return
    for size in range(1, min(max_size, layers) + 1):
        for rest in compositions(layers - size, max_size):
            yield (tuple(range(size)),) + tuple(tuple(i + size for i in g) for g in rest)


def brute_best(costs, layers, max_size):
    best = {}
    for groups in compositions(layers, max_size):
        if any(len(g) > 1 and (g[0], len(g)) not in costs for g in groups):
            continue
        value = sum(costs[(g[0], len(g))] for g in groups if len(g) > 1)
        if len(groups) not in best or value < best[len(groups)]:
            best[len(groups)] = value
    return best


def test_resumed_calibration_kl_equals_a_full_evaluation(setup):
    original, calibration, _, _ = setup
    plans = [from_parallel_groups([[2, 3]], LAYERS, 1), from_parallel_groups([[0, 1, 2], [4, 5]], LAYERS, 2),
             from_parallel_groups([[4, 5]], LAYERS, 0), from_parallel_groups([[3, 4]], LAYERS, 1, dropped=(1,)),
             from_parallel_groups([], LAYERS, 0, dropped=(5,)), identity_plan(LAYERS)]
    resumed = calibration_kl(original, plans, calibration, batch_size=3, progress=False)
    for plan, kl in zip(plans, resumed):
        full = evaluate(original, {"p": original.with_plan(plan)}, calibration, progress=False)["p"]["kl"]
        assert kl == pytest.approx(full, rel=1e-4, abs=1e-9)
    assert resumed[-1] == 0.0 and min(resumed[:-1]) > 0


def test_candidates_are_every_run_under_each_distinct_bypass(candidates):
    keys = {(c.start, c.size, c.bypass) for c in candidates}
    expected = {(s, 2, d) for s in range(5) for d in (0, 1)} | {(s, 3, d) for s in range(4) for d in (0, 1, 2)}
    assert keys == expected and len(candidates) == len(expected)
    assert all(c.kl is not None and c.kl > 0 and -1 <= c.similarity <= 1 for c in candidates)


def test_pruning_measures_only_the_most_similar_candidates(setup, candidates):
    original, calibration, _, _ = setup
    pruned = score_candidates(original, calibration, 3, (0, 1, 2), proxy_keep=0.5, progress=False)
    full = {(c.start, c.size, c.bypass): c for c in candidates}
    for size, count in ((2, 5), (3, 4)):
        ranked = sorted(range(count), key=lambda s: -full[(s, size, 0)].similarity)
        kept = {s for s in ranked[:math.ceil(count / 2)]}
        for c in pruned:
            if c.size == size:
                assert (c.kl is not None) == (c.start in kept)
                if c.kl is not None:
                    assert c.kl == pytest.approx(full[(c.start, c.size, c.bypass)].kl, rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dp_matches_brute_force_on_random_costs(seed):
    rng = random.Random(seed)
    layers, max_size = 8, 3
    costs = {(s, p): rng.random() for p in (2, 3) for s in range(layers - p + 1) if rng.random() > 0.2}
    frontier = best_by_depth(costs, layers, max_size)
    brute = brute_best(costs, layers, max_size)
    assert set(frontier) == set(brute)
    for depth, (cost, groups) in frontier.items():
        assert cost == pytest.approx(brute[depth])
        assert len(groups) == depth and [i for g in groups for i in g] == list(range(layers))
        assert predicted_kl(groups, costs) == pytest.approx(cost)


def test_dp_matches_brute_force_on_measured_costs(candidates):
    for d in (0, 1, 2):
        costs = group_costs(candidates, d)
        frontier = best_by_depth(costs, LAYERS, 3)
        brute = brute_best(costs, LAYERS, 3)
        assert {k: v[0] for k, v in frontier.items()} == pytest.approx(brute)
        assert frontier[LAYERS] == (0.0, tuple((i,) for i in range(LAYERS)))


def test_target_depth_gives_a_valid_plan_of_that_depth(setup):
    original, calibration, held_out, record = setup
    for depth, size in ((4, 2), (3, 2), (2, 3)):
        request = SearchRequest(target_depth=depth, max_group_size=size, bypass_choices=(0, 1))
        result = search(original, calibration, held_out, request, record, progress=False)
        plan = result.plan
        assert plan.depth == depth and plan.max_group_size <= size and plan.num_layers == LAYERS
        Plan(plan.groups, plan.bypass)  # validates
        measured = evaluate(original, {"p": original.with_plan(plan)}, held_out, progress=False)["p"]["kl"]
        assert result.report["measured"]["kl"] == pytest.approx(measured, rel=1e-5)


@pytest.mark.parametrize("factor", [1.0, 2.5, 5.0])  # 1.0: the held-out KL exceeds the prediction: repaired
def test_budget_is_met_by_the_measured_kl(setup, candidates, factor):
    original, calibration, held_out, record = setup
    budget = factor * min(c.kl for c in candidates if c.size == 2 and c.bypass <= 1)
    result = search(original, calibration, held_out, SearchRequest(max_kl=budget, bypass_choices=(0, 1)),
                    record, progress=False)
    plan = result.plan
    measured = evaluate(original, {"p": original.with_plan(plan)}, held_out, progress=False)["p"]["kl"]
    assert measured <= budget
    if factor > 1:
        assert plan.depth < LAYERS  # the budget buys at least one parallel group
    assert result.report["steps"][-1]["measured"]["kl"] == pytest.approx(measured, rel=1e-5)


def test_repair_splits_until_the_measurement_fits():
    costs = {(0, 2): 0.3, (2, 2): 0.1, (4, 2): 0.2, (1, 2): 0.5, (3, 2): 0.5}
    start = Choice(((0, 1), (2, 3), (4, 5)), 0, 0.6)
    steps = repair(start, costs, lambda c: 2 * c.predicted_kl, budget=0.25)  # reality twice the prediction
    assert [len(s.groups) for s, _ in steps] == [3, 4, 5]
    assert steps[1][0].groups == ((0,), (1,), (2, 3), (4, 5))  # the costliest pair goes first
    assert steps[2][0].groups == ((0,), (1,), (2, 3), (4,), (5,))
    assert [m for _, m in steps] == pytest.approx([1.2, 0.6, 0.2])
    never = repair(start, costs, lambda c: 1.0 if len(c.groups) < LAYERS else 0.0, budget=0.5)
    assert never[-1][0].groups == tuple((i,) for i in range(LAYERS)) and never[-1][1] == 0.0


def test_select_prefers_the_shallowest_plan_within_budget():
    cands = [Candidate(s, 2, d, 0.9, 0.1 * (s + 1) + 0.05 * d) for s in range(3) for d in (0, 1)]
    # depth 2 needs pairs 0-1 and 2-3: predicted 0.4 with d=0, 0.5 with d=1
    choice = select(cands, SearchRequest(max_kl=0.45, bypass_choices=(0, 1)), 4)
    assert (choice.groups, choice.bypass, choice.predicted_kl) == (((0, 1), (2, 3)), 0, pytest.approx(0.4))
    choice = select(cands, SearchRequest(max_kl=0.35, bypass_choices=(0, 1)), 4)
    assert (choice.groups, choice.bypass, choice.predicted_kl) == (((0, 1), (2,), (3,)), 0, pytest.approx(0.1))
    choice = select(cands, SearchRequest(target_depth=2, bypass_choices=(1,)), 4)
    assert (choice.groups, choice.bypass, choice.predicted_kl) == (((0, 1), (2, 3)), 1, pytest.approx(0.5))
    assert select(cands, SearchRequest(max_kl=0.01, bypass_choices=(0, 1)), 4).groups == tuple((i,) for i in range(4))


def test_search_is_deterministic(setup):
    original, calibration, held_out, record = setup
    request = SearchRequest(target_depth=4, max_group_size=3, bypass_choices=(0, 1, 2))
    first = search(original, calibration, held_out, request, record, progress=False)
    second = search(original, calibration, held_out, request, record, progress=False)
    assert first.plan == second.plan and first.report == second.report


@pytest.mark.parametrize("request_kwargs, message", [
    (dict(target_depth=2), "--target-depth 2 is impossible"),  # ceil(6 / 2) = 3
    (dict(target_depth=7), "--target-depth 7 is impossible"),
    (dict(target_depth=3, max_group_size=1), "--max-group-size 1"),
    (dict(target_depth=3, bypass_choices=(2,)), "bypass choice 2"),
    (dict(), "exactly one of"),
    (dict(target_depth=3, max_kl=0.1), "exactly one of"),
    (dict(max_kl=0.0), "--max-kl 0.0"),
    (dict(target_depth=3, proxy_keep=0.0), "--proxy-keep"),
])
def test_impossible_requests_are_refused(request_kwargs, message):
    kwargs = dict(bypass_choices=(0, 1))
    kwargs.update(request_kwargs)
    with pytest.raises(CqilError, match=message.replace("(", r"\(")):
        SearchRequest(**kwargs).check(LAYERS)


def test_bypass_choices_parse():
    assert parse_bypass_choices("1, 0,1") == (0, 1)
    for bad in ("", "a,1"):
        with pytest.raises(CqilError, match="--bypass-choices"):
            parse_bypass_choices(bad)


def test_pruning_too_hard_for_the_depth_is_an_error(setup):
    original, calibration, held_out, record = setup
    request = SearchRequest(target_depth=3, max_group_size=2, bypass_choices=(0,), proxy_keep=0.2)
    with pytest.raises(CqilError, match="raise --proxy-keep"):
        search(original, calibration, held_out, request, record, progress=False)


def test_cli_writes_plan_and_table_deterministically(tiny_model_dir, tmp_path, capsys):
    model = str(tiny_model_dir("llama", LAYERS))
    args = ["plan", "--auto", "--model", model, "--target-depth", "4", "--seq-len", str(SEQ),
            "--max-chunks", "4", "--eval-chunks", "4"]
    outputs = []
    for name in ("a", "b"):
        out = tmp_path / name / "plan.json"
        assert main(args + ["--out", str(out)]) == 0
        outputs.append((out.read_bytes(), out.with_suffix(".search.json").read_bytes()))
    assert outputs[0] == outputs[1]
    plan = load_plan(tmp_path / "a" / "plan.json", LAYERS)
    table = json.loads(outputs[0][1])
    assert plan.depth == 4 and table["plan"]["groups"] == [list(g) for g in plan.groups]
    assert len(table["candidates"]) == 5  # the default bypass choice is d = 1 alone
    assert all(c["kl"] > 0 and c["bypass"] == 1 for c in table["candidates"])
    assert table["calibration"]["chunks"] == 4 and table["held_out"]["chunks"] == 4
    assert "held-out KL" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--target-depth", "4"], "add --auto"),
    (["--auto", "--target-depth", "4", "--uniform", "0:4:2"], "drop --uniform"),
    (["--auto", "--target-depth", "4", "--bypass", "1"], "drop --bypass"),
    (["--auto", "--target-depth", "1"], "--target-depth 1 is impossible"),
])
def test_cli_refuses_bad_requests(tiny_model_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", str(tiny_model_dir("llama", LAYERS)), "--out", str(out)] + extra) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not out.with_suffix(".search.json").exists()


def test_identity_fallback_records_bypass_zero():
    choice = Choice(tuple((i,) for i in range(LAYERS)), 1, 0.0)
    assert choice.plan({}).bypass == 0 and choice.plan({}).is_identity


def test_head_every_scores_every_kth_position_of_a_full_evaluation(setup):
    original, calibration, _, _ = setup
    plan = from_parallel_groups([[2, 3]], LAYERS, 1)
    for every in (1, 3, 4):
        [kl] = calibration_kl(original, [plan], calibration, batch_size=3, progress=False, head_every=every)
        with torch.no_grad():  # independently: whole forwards, then the KL at positions k-1, 2k-1, ...
            reference = torch.log_softmax(original(calibration)[0], -1)[:, every - 1::every]
            other = torch.log_softmax(original.with_plan(plan)(calibration)[0], -1)[:, every - 1::every]
        expected = (reference.exp() * (reference - other)).sum(-1).mean()
        assert kl == pytest.approx(float(expected), rel=1e-4)


def test_fast_search_returns_the_exhaustive_plan(tiny_model_dir):
    """The defaults of the fast search (fewer calibration chunks, every 4th position, d = 1 only) pick
    the plan that today's exhaustive scoring (8 chunks, every position, d in {0, 1}) picks."""
    from cqil.pipeline.build_config import DEFAULTS
    from cqil.pipeline.sources import load_model

    layers = 8
    loaded = load_model(tiny_model_dir("llama", layers))
    split = load_split(loaded.tokenizer, seq_len=64)
    original = CqilModel(loaded.model, identity_plan(layers))
    record = model_record(loaded.model.config)
    fast = DEFAULTS["plan"]
    for depth in (7, 6, 5):
        exhaustive = search(original, split.train[:8], split.held_out[:2],
                            SearchRequest(target_depth=depth, bypass_choices=(0, 1)), record, progress=False)
        quick = search(original, split.train[: fast["calibration_chunks"]], split.held_out[:2],
                       SearchRequest(target_depth=depth, bypass_choices=parse_bypass_choices(fast["bypass_choices"]),
                                     head_every=fast["head_every"]), record, progress=False)
        assert quick.plan == exhaustive.plan, depth
        assert quick.report["calibration"]["scored_positions"] < exhaustive.report["calibration"]["scored_positions"]


def test_uniform_of_depth_is_the_paper_style_plan():
    from cqil.pipeline.autoplan import uniform_of_depth

    spec, plan = uniform_of_depth(30, 23, 2, 1)
    assert spec == "15:30:2" and plan.depth == 23 and plan.bypass == 1
    assert [g for g in plan.groups if len(g) > 1] == [(s, s + 1) for s in range(15, 29, 2)]
    assert plan.groups[-1] == (29,)
    assert uniform_of_depth(6, 6, 2, 1) is None  # no parallel group at all is not a plan to compare with
