"""Depth pruning on a tiny model: block influence against hooks on the HF layers, greedy against full
evaluations of every candidate plan, and the `cqil plan --prune` command."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from cqil.model.plan import load_plan, pruned_plan
from cqil.pipeline.cli import main
from cqil.pipeline.prune import block_influence, choose, greedy_kl
from cqil.pipeline.quality import evaluate

from tests.helpers import original_on_default_text

LAYERS = 6
SEQ = 32


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    _, original, split = original_on_default_text(tiny_model_dir("llama", LAYERS), LAYERS, SEQ)
    return original, split.train[:4]


def test_block_influence_is_one_minus_mean_cosine_of_each_layers_input_and_output(setup):
    original, calibration = setup
    seen: dict[int, list[float]] = {i: [] for i in range(LAYERS)}

    def hook(index):
        def record(module, args, kwargs, output):
            given = kwargs.get("hidden_states", args[0] if args else None)
            out = output[0] if isinstance(output, tuple) else output
            seen[index].append(F.cosine_similarity(given, out, dim=-1).flatten())
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(original.hf.model.layers)]
    try:
        with torch.no_grad():
            original.hf(calibration)
    finally:
        for handle in handles:
            handle.remove()
    expected = [1 - float(torch.cat(seen[i]).double().mean()) for i in range(LAYERS)]
    got = block_influence(original, calibration, batch_size=3, progress=False)
    assert got == pytest.approx(expected, abs=1e-5)
    pruning = choose("block-influence", original, calibration, 2, progress=False)
    assert set(pruning.dropped) == set(sorted(range(LAYERS), key=lambda i: expected[i])[:2])


def test_greedy_rounds_equal_full_evaluations_and_pick_the_least_kl(setup):
    original, calibration = setup
    rounds = greedy_kl(original, calibration, 2, batch_size=3, progress=False)

    def full(dropped):
        plan = pruned_plan(dropped, LAYERS)
        return evaluate(original, {"p": original.with_plan(plan)}, calibration, progress=False)["p"]["kl"]

    first = {layer: full([layer]) for layer in range(LAYERS)}
    assert rounds[0] == pytest.approx(first, rel=1e-4)
    chosen = min(first, key=first.get)
    second = {layer: full([chosen, layer]) for layer in range(LAYERS) if layer != chosen}
    assert rounds[1] == pytest.approx(second, rel=1e-4)
    pruning = choose("greedy", original, calibration, 2, batch_size=3, progress=False)
    assert pruning.dropped == (chosen, min(second, key=second.get))


def test_cli_writes_a_pruned_plan_and_its_table(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", str(tiny_model_dir("llama", LAYERS)), "--prune", "2", "--method", "greedy",
                 "--seq-len", str(SEQ), "--max-chunks", "4", "--eval-chunks", "2", "--head-every", "1",
                 "--out", str(out)]) == 0
    plan = load_plan(out, LAYERS)
    table = json.loads(out.with_suffix(".prune.json").read_text())
    assert len(plan.dropped) == 2 and plan.depth == 4 and sorted(table["order"]) == list(plan.dropped)
    assert table["measured"]["kl"] > 0 and table["calibration"]["chunks"] == 4
    assert "held-out KL" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--prune", "6"], "--prune 6 must be in 1..5"),
    (["--prune", "2", "--uniform", "0:4:2"], "--prune chooses the plan itself: drop --uniform"),
    (["--method", "greedy"], "add --prune K"),
])
def test_cli_refuses_bad_prune_requests(tiny_model_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", str(tiny_model_dir("llama", LAYERS)), "--out", str(out)] + extra) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
