"""Hybrid plans under a latency budget: the DP (its best and its k best layouts) against brute force (synthetic
and measured KL, a synthetic cost model), verify-and-repair on a tiny model whose dropped layers' KLs do not add
up, the CLI's plan with its `latency` record, and bad cost-model files refused with one line."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
import torch
from cqil.engines.cost_model import CostModel, cost_model_from_dict, load_cost_model
from cqil.model.cqil import CqilModel
from cqil.model.errors import CqilError
from cqil.model.plan import from_parallel_groups, identity_plan, load_plan, pruned_plan
from cqil.pipeline.autoplan import calibration_kl, score_candidates
from cqil.pipeline.cli import main
from cqil.pipeline.data import load_split
from cqil.pipeline.hybrid import (
    KINDS,
    Parts,
    choose,
    parts_from,
    paying_sizes,
    ranked,
    score_drops,
    score_parts,
    tables,
    verify_frontier,
)

from tests.helpers import tiny_model

LAYERS = 6
SEQ = 32
# base 2 + 6 layers of 1 = 8 per step: a pair costs 1.5 (saves 0.5), a triple 2.25 (saves 0.75)
COSTS = CostModel("synthetic", 2.0, 1.0, {"branches": {2: 1.5, 3: 2.25}}, {})


def layouts(layers: int, max_size: int):
    """Every way to cover 0..layers-1 by parts: ('alone', i), ('drop', i), ('group', start, size)."""
    if layers == 0:
        yield ()
        return
    for rest in layouts(layers - 1, max_size):
        shifted = tuple((p[0], p[1] + 1, *p[2:]) for p in rest)
        yield (("alone", 0),) + shifted
        yield (("drop", 0),) + shifted
    for size in range(2, min(max_size, layers) + 1):
        for rest in layouts(layers - size, max_size):
            yield (("group", 0, size),) + tuple((p[0], p[1] + size, *p[2:]) for p in rest)


def all_layouts_kl(parts: Parts, budget: float, kind: str, max_size: int) -> dict[tuple, float]:
    """Every distinct plan of `kind` within `budget` (layout and the bypass it records) -> its summed KL."""
    found = {}
    for layout in layouts(LAYERS, max_size):
        if any(p[0] not in KINDS[kind] for p in layout) or all(p[0] == "drop" for p in layout):
            continue
        step = COSTS.base + sum({"alone": COSTS.layer, "drop": 0.0}.get(p[0]) if p[0] != "group"
                                else COSTS.groups["branches"][p[2]] for p in layout)
        if step / COSTS.original(LAYERS) > budget + 1e-12:
            continue
        largest = max([p[2] for p in layout if p[0] == "group"], default=1)
        for d, costs in parts.groups.items():
            if any(p[0] == "group" and (p[1], p[2]) not in costs for p in layout):
                continue
            kl = sum(parts.drop[p[1]] if p[0] == "drop" else costs[(p[1], p[2])] if p[0] == "group" else 0.0
                     for p in layout)
            key = (layout, min(d, largest - 1))
            found[key] = min(kl, found.get(key, kl))
    return found


def brute_force(parts: Parts, budget: float, kind: str, max_size: int) -> float | None:
    """The lowest summed KL of any plan of `kind` within `budget`."""
    return min(all_layouts_kl(parts, budget, kind, max_size).values(), default=None)


def check_against_brute_force(parts: Parts, budget: float, kind: str):
    expected = brute_force(parts, budget, kind, 3)
    if expected is None:
        with pytest.raises(CqilError, match="raise --latency-budget"):
            choose(parts, LAYERS, COSTS, budget, kind, 3)
        return
    got = choose(parts, LAYERS, COSTS, budget, kind, 3)
    assert got.predicted_kl == pytest.approx(expected, abs=1e-12)
    assert got.predicted_ratio <= budget + 1e-12
    plan = from_parallel_groups([list(g) for g in got.groups if len(g) > 1], LAYERS, 0, {}, got.dropped)
    assert COSTS.predicted_ratio(plan) == pytest.approx(got.predicted_ratio)


@pytest.mark.parametrize("seed", range(4))
def test_dp_matches_brute_force_on_random_kl(seed):
    rng = random.Random(seed)
    groups = {d: {(s, size): rng.uniform(0.01, 1.0) for size in (2, 3) for s in range(LAYERS - size + 1)
                  if rng.random() < 0.9} for d in (0, 1)}
    parts = Parts({i: rng.uniform(0.05, 2.0) for i in range(LAYERS)}, groups)
    for budget, kind in itertools.product((0.5, 0.7, 0.8, 0.9, 1.0), KINDS):
        check_against_brute_force(parts, budget, kind)


@pytest.mark.parametrize("seed", range(3))
def test_k_best_layouts_match_brute_force(seed):
    """One table up to the largest budget gives the k least-KL distinct plans of every smaller budget."""
    rng = random.Random(seed)
    groups = {d: {(s, size): rng.uniform(0.01, 1.0) for size in (2, 3) for s in range(LAYERS - size + 1)}
              for d in (0, 1)}
    parts = Parts({i: rng.uniform(0.05, 2.0) for i in range(LAYERS)}, groups)
    for kind in KINDS:
        by_d = tables(parts, LAYERS, COSTS, 0.95, kind, 3, k=5)
        for budget in (0.7, 0.8, 0.95):
            got = ranked(by_d, budget, 5, LAYERS, COSTS)
            expected = sorted(all_layouts_kl(parts, budget, kind, 3).values())[:5]
            assert [c.predicted_kl for c in got] == pytest.approx(expected, abs=1e-12)
            assert len({c.key for c in got}) == len(got)
            assert all(c.predicted_ratio <= budget + 1e-12 for c in got)


@pytest.fixture(scope="module")
def measured(tiny_model_dir):
    from cqil.pipeline.sources import load_model

    loaded = load_model(tiny_model_dir("llama", LAYERS))
    calibration = load_split(loaded.tokenizer, seq_len=SEQ).train[:2]
    original = CqilModel(loaded.model, identity_plan(LAYERS))
    candidates = score_candidates(original, calibration, 3, (1,), progress=False)
    return parts_from(candidates, score_drops(original, calibration, progress=False), (1,))


def test_search_on_measured_kl_picks_the_brute_force_optimum(measured):
    for budget, kind in itertools.product((0.75, 0.85, 0.95), KINDS):
        check_against_brute_force(measured, budget, kind)
    # the hybrid is never worse than either pure kind at the same budget (CQIL alone cannot reach 0.75 here)
    for budget in (0.75, 0.85, 0.95):
        hybrid = choose(measured, LAYERS, COSTS, budget, "hybrid", 3).predicted_kl
        for kind in ("prune", "cqil") if budget > 0.8 else ("prune",):
            assert hybrid <= choose(measured, LAYERS, COSTS, budget, kind, 3).predicted_kl + 1e-12


@pytest.fixture(scope="module")
def twin_layers(tokenizer):
    """A tiny model whose layer 3 is a copy of layer 2, both scaled to 0.4: each dropped alone costs little,
    both together remove the same change twice, about twice the sum of their KLs alone."""
    model = tiny_model("llama", LAYERS)
    with torch.no_grad():
        layers = model.model.layers
        layers[3].load_state_dict(layers[2].state_dict())
        for layer in (2, 3):
            layers[layer].self_attn.o_proj.weight.mul_(0.4)
            layers[layer].mlp.down_proj.weight.mul_(0.4)
    original = CqilModel(model, identity_plan(LAYERS))
    calibration = load_split(tokenizer, seq_len=SEQ).train[:2]
    _, parts = score_parts(original, calibration, 3, (1,), progress=False)
    return original, calibration, parts


def test_repair_keeps_the_measured_best_where_dropped_layers_do_not_add_up(twin_layers):
    original, calibration, parts = twin_layers

    def measure(plans):
        return calibration_kl(original, plans, calibration, progress=False)

    budget = 0.75  # two of six layers dropped: (2 + 4) / 8
    pick = choose(parts, LAYERS, COSTS, budget, "prune", 3)
    assert pick.dropped == (2, 3)  # the additive prediction takes the twins
    assert measure([pick.plan({}, LAYERS)])[0] > 1.5 * pick.predicted_kl
    feasible = [pruned_plan(list(drop), LAYERS) for n in range(2, LAYERS)
                for drop in itertools.combinations(range(LAYERS), n)]
    best = min(measure(feasible))  # every prune-only plan within the budget, measured as a whole

    points = verify_frontier(parts, LAYERS, COSTS, [0.85, budget], 3, measure)
    prune = points["prune"][budget]
    assert prune.source == "repair" and prune.choice.dropped != (2, 3)
    assert prune.measured_kl == pytest.approx(best, rel=1e-9)
    assert prune.measured_kl == pytest.approx(measure([prune.choice.plan({}, LAYERS)])[0], rel=1e-9)
    assert prune.tried[0][0] == pick and len(prune.tried) > 1
    for b, hybrid in points["hybrid"].items():  # never worse than either pure kind, measured
        assert hybrid.choice.predicted_ratio <= b + 1e-12
        for kind in ("prune", "cqil"):
            if b in points[kind]:
                assert hybrid.measured_kl <= points[kind][b].measured_kl + 1e-12
    assert points["hybrid"][budget].measured_kl < measure([pick.plan({}, LAYERS)])[0]

    unrepaired = verify_frontier(parts, LAYERS, COSTS, [budget], 3, measure, margin=math.inf)
    assert unrepaired["prune"][budget].choice == pick and unrepaired["prune"][budget].source == "prediction"


def test_groups_that_cost_their_layers_alone_are_not_scored(twin_layers):
    sequential = CostModel("sequential", 2.0, 1.0, {"branches": {2: 2.0, 3: 2.9}}, {})
    assert paying_sizes(COSTS, 3) == [2, 3] and paying_sizes(sequential, 3) == [3]
    assert paying_sizes(sequential, 3, "fused") == [] and paying_sizes(None, 3) == [2, 3]
    original, calibration, parts = twin_layers
    candidates, only_triples = score_parts(original, calibration, 3, (1,), progress=False, sizes=[3])
    assert all(c.kl is None for c in candidates if c.size == 2)
    assert only_triples.drop == pytest.approx(parts.drop, rel=1e-9)
    assert only_triples.groups[1] == pytest.approx({key: kl for key, kl in parts.groups[1].items() if key[1] == 3},
                                                   rel=1e-9)
    full = score_candidates(original, calibration, 3, (1,), progress=False)  # autoplan's own scoring
    assert {(c.start, c.size): c.kl for c in full if c.size == 3} == pytest.approx(only_triples.groups[1], rel=1e-6)


def test_cli_records_latency_in_the_plan(tiny_model_dir, tmp_path, capsys):
    cost = tmp_path / "cost.json"
    cost.write_text(json.dumps(COSTS.to_dict()))
    out = tmp_path / "plan.json"
    assert main(["plan", "--auto", "--model", str(tiny_model_dir("llama", LAYERS)), "--latency-budget", "0.8",
                 "--cost-model", str(cost), "--max-group-size", "3", "--seq-len", str(SEQ), "--max-chunks", "2",
                 "--eval-chunks", "1", "--out", str(out)]) == 0
    plan = load_plan(out, LAYERS)
    data = json.loads(out.read_text())
    assert data["latency"]["target"] == "synthetic" and data["latency"]["budget"] == 0.8
    assert data["latency"]["predicted_ratio"] == pytest.approx(COSTS.predicted_ratio(plan), rel=1e-5)
    assert data["latency"]["predicted_ratio"] <= 0.8
    assert plan.latency == data["latency"]
    frontier = json.loads(out.with_suffix(".pareto.json").read_text())
    assert set(frontier["kinds"]) == set(KINDS)
    assert out.with_suffix(".pareto.png").stat().st_size > 1000
    assert "predicted latency ratio" in capsys.readouterr().out


@pytest.mark.parametrize("content, message", [
    ("not json", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"format": "cqil-cost-model/9"}', "format 'cqil-cost-model/9' is not"),
    ('{"format": "cqil-cost-model/1", "target": "x", "base_s": 1, "group_s": {}}', "lacks 'layer_s'"),
    ('{"format": "cqil-cost-model/1", "target": "x", "base_s": 1, "layer_s": -1, "group_s": {}}',
     "'layer_s' must be a non-negative number"),
    ('{"format": "cqil-cost-model/1", "target": "x", "base_s": 1, "layer_s": 1, "group_s": {"branches": {"1": 1}}}',
     "group size '1'"),
])
def test_bad_cost_model_files_exit_2_with_one_line(tiny_model_dir, tmp_path, capsys, content, message):
    cost = tmp_path / "cost.json"
    cost.write_text(content)
    out = tmp_path / "plan.json"
    assert main(["plan", "--auto", "--model", str(tiny_model_dir("llama", LAYERS)), "--latency-budget", "0.8",
                 "--cost-model", str(cost), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_cost_model_round_trip(tmp_path):
    path = tmp_path / "cost.json"
    path.write_text(json.dumps(COSTS.to_dict()))
    again = load_cost_model(path)
    assert again == COSTS
    assert cost_model_from_dict(COSTS.to_dict()).predicted_ratio(identity_plan(LAYERS)) == 1.0


def test_cost_model_cuts_keep_the_layers_they_time():
    from cqil.engines.cost_model import CostSettings, cut_plans

    cuts = cut_plans(LAYERS, CostSettings(singles=3, max_group_size=2, layouts=("fused",)), {})
    assert {name: (plan.layers, plan.max_group_size, layout) for name, (plan, layout) in cuts.items()} == {
        "1": ([0], 1, "branches"), "n": ([0, 1, 2], 1, "branches"), "g2.fused": ([0, 1], 2, "fused")}


@pytest.mark.slow  # three ONNX exports and their timing: about a minute on an idle 2-core machine
def test_bench_measures_a_cost_model_the_search_reads(tiny_model_dir, tmp_path, capsys):
    cost = tmp_path / "cost.json"
    assert main(["bench", "--model", str(tiny_model_dir("llama", LAYERS)), "--cost-model", str(cost),
                 "--cost-max-group-size", "2", "--cost-layouts", "branches", "--past", "16",
                 "--decode-repeats", "5", "--threads", "1"]) == 0
    model = load_cost_model(cost)
    assert model.target == "onnxruntime-cpu (1 threads)" and model.layer > 0 and model.base >= 0
    assert set(model.groups) == {"branches"} and set(model.groups["branches"]) == {2}
    assert set(model.details["median_step_s"]) == {"1", "n", "g2.branches"}
    assert "layer" in capsys.readouterr().out


def test_bench_measures_a_cost_model_on_two_ranks(tiny_model_dir, tmp_path, capfd):
    """gloo on this CPU: the single-layer cuts run whole on each rank, the pair with one layer per rank."""
    cost = tmp_path / "cost.json"
    assert main(["bench", "--model", str(tiny_model_dir("llama", LAYERS)), "--cost-model", str(cost), "--ranks", "2",
                 "--backend", "gloo", "--past", "16", "--decode-repeats", "40", "--warmup", "3"]) == 0
    model = load_cost_model(cost)
    assert model.target == "torch.distributed (2 ranks, gloo, 1 threads each)" and model.engine == "ranks"
    assert model.groups == {"branches": {2: model.groups["branches"][2]}, "fused": {2: model.groups["branches"][2]}}
    median = model.details["median_step_s"]
    assert set(median) == {"1", "n", "g2.branches"}
    # one layer from the cut of 4 against the cut of 1, the rest of that step is the base (clamped at 0 when
    # load makes the cut of 4 slow), a pair is its cut less the base
    assert model.layer == pytest.approx(max((median["n"] - median["1"]) / 3, 1e-9), rel=1e-3)
    assert model.base == pytest.approx(max(median["1"] - model.layer, 0.0), abs=1e-6)
    assert model.groups["branches"][2] == pytest.approx(max(median["g2.branches"] - model.base, 0.0), abs=1e-6)
    assert choose(Parts({i: 1.0 for i in range(LAYERS)}, {1: {}}), LAYERS, model, 0.99, "prune", 2).dropped
    assert "torch.distributed (2 ranks" in capfd.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--ranks", "1"], "--ranks 1: a cost model on ranks needs at least 2"),
    (["--ranks", "2", "--cost-device", "cuda"], "drop --cost-device"),
    (["--cost-device", "cuda"], "--cost-device cuda needs a CUDA GPU"),
])
def test_cost_model_targets_refused_with_one_line(tiny_model_dir, tmp_path, capsys, extra, message):
    if "--ranks" not in extra and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: the CUDA cost model would run")
    cost = tmp_path / "cost.json"
    assert main(["bench", "--model", str(tiny_model_dir("llama", LAYERS)), "--cost-model", str(cost), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not cost.exists()


def test_device_cost_model_code_path_runs_eagerly_off_cuda(tiny_model_dir):
    """The CUDA cost model's code (cut models, DecodeStep, medians) on the CPU, where DecodeStep runs eagerly."""
    from cqil.engines.cost_model import CostSettings, measure_device_cost_model
    from cqil.pipeline.sources import load_model

    loaded = load_model(tiny_model_dir("llama", LAYERS))
    original = CqilModel(loaded.model, identity_plan(LAYERS))
    settings = CostSettings(past=8, repeats=3, warmup=1, singles=3, max_group_size=3, layouts=("branches", "fused"))
    model = measure_device_cost_model(original, settings, "cpu", progress=False)
    assert model.target == "torch-cpu (eager)" and model.engine == "torch-cpu"
    assert set(model.groups) == {"branches", "fused"} and model.groups["branches"] == model.groups["fused"]
    assert set(model.groups["branches"]) == {2, 3} and model.layer > 0
    median = model.details["median_step_s"]
    assert model.layer == pytest.approx((median["n"] - median["1"]) / 2, abs=1e-6)  # the record rounds to 1 µs


def test_measure_latency_refuses_a_target_it_cannot_time(tiny_model_dir, tmp_path, capsys):
    cost = tmp_path / "cost.json"
    cost.write_text(json.dumps(COSTS.to_dict()))
    out = tmp_path / "plan.json"
    assert main(["plan", "--auto", "--model", str(tiny_model_dir("llama", LAYERS)), "--latency-budget", "0.8",
                 "--cost-model", str(cost), "--measure-latency", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--measure-latency times plans on ONNX Runtime CPU" in err and len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.slow  # exports every distinct frontier plan of the tiny model and times it: a few minutes here
def test_frontier_carries_measured_latency_beside_predicted(tiny_model_dir, tmp_path):
    model_dir = str(tiny_model_dir("llama", LAYERS))
    cost, out = tmp_path / "cost.json", tmp_path / "plan.json"
    assert main(["bench", "--model", model_dir, "--cost-model", str(cost), "--cost-max-group-size", "2",
                 "--cost-layouts", "branches", "--past", "16", "--decode-repeats", "20", "--threads", "1"]) == 0
    assert main(["plan", "--auto", "--model", model_dir, "--latency-budget", "0.8", "--cost-model", str(cost),
                 "--seq-len", str(SEQ), "--max-chunks", "2", "--eval-chunks", "1", "--measure-latency",
                 "--latency-repeats", "20", "--out", str(out)]) == 0
    frontier = json.loads(out.with_suffix(".pareto.json").read_text())
    points = [p for kind in ("prune", "hybrid") for p in frontier["kinds"][kind]]
    assert points and all(p["measured_ratio"] > 0 and p["measured_step_s"] > 0 for p in points)
    for p in points:  # a plan that drops layers runs fewer of them: measurably faster than the original
        if len(p["dropped"]) >= 2:
            assert p["measured_ratio"] < 0.95
    plan = json.loads(out.read_text())
    assert plan["latency"]["measured_ratio"] == next(p["measured_ratio"] for p in frontier["kinds"]["hybrid"]
                                                     if p["budget"] == 0.8)
