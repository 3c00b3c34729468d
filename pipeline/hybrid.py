"""Hybrid plans under a latency budget: each layer alone, in a CQIL group, or dropped, whichever a target's
cost model (engines/cost_model.py) says buys the least KL for the time saved.

Scoring reuses the automatic search's (pipeline.autoplan): every candidate group, and every layer dropped
alone, gets its calibration KL with everything else as in the original; the KL of a plan is predicted as
the sum of its parts'. Dynamic programming over the layers, with the decode-step cost in whole units of
1/UNITS of the original's step (each part's cost rounded up, so the exact prediction never exceeds the
budget), finds the least predicted KL whose predicted latency ratio is at most R. `kinds` restricts the
parts: prune-only (alone or dropped), CQIL-only (alone or grouped), hybrid (all three).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from cqil.engines.cost_model import CostModel
from cqil.model.cqil import CqilModel
from cqil.model.errors import CqilError
from cqil.model.plan import Plan, from_parallel_groups, pruned_plan
from cqil.pipeline.autoplan import Candidate, calibration_kl, group_costs

UNITS = 1000  # cost resolution: 1/UNITS of the original's decode step
KINDS = {"prune": ("alone", "drop"), "cqil": ("alone", "group"), "hybrid": ("alone", "drop", "group")}


@dataclass(frozen=True)
class Parts:
    """Calibration KL of each part applied alone: dropped layers, and groups (start, size) per bypass d."""

    drop: dict[int, float]
    groups: dict[int, dict[tuple[int, int], float]]  # d -> (start, size) -> KL


def score_drops(original: CqilModel, chunks: torch.Tensor, batch_size: int = 4, progress: bool = True,
                head_every: int = 1) -> dict[int, float]:
    """Every layer dropped alone: its calibration KL (resumed from the original's stream at that layer)."""
    layers = original.num_layers
    plans = [pruned_plan([layer], layers) for layer in range(layers)]
    return dict(enumerate(calibration_kl(original, plans, chunks, batch_size, progress, head_every)))


def parts_from(candidates: Sequence[Candidate], drops: dict[int, float], bypass_choices: Sequence[int]) -> Parts:
    return Parts(dict(drops), {d: group_costs(candidates, d) for d in bypass_choices})


@dataclass(frozen=True)
class HybridChoice:
    groups: tuple[tuple[int, ...], ...]
    dropped: tuple[int, ...]
    bypass: int
    predicted_kl: float
    predicted_ratio: float

    def plan(self, record: dict, num_layers: int) -> Plan:
        largest = max(len(g) for g in self.groups)
        parallel = [list(g) for g in self.groups if len(g) > 1]
        return from_parallel_groups(parallel, num_layers, min(self.bypass, largest - 1), record, self.dropped)


def best_under_budget(costs: dict[tuple[int, int], float], drops: dict[int, float], num_layers: int,
                      cost_model: CostModel, budget: float, kinds: Sequence[str], max_group_size: int,
                      layout: str = "branches") -> tuple[float, tuple, tuple] | None:
    """(predicted KL, groups, dropped) of the least-KL layout whose predicted ratio is <= `budget`, or None.

    Ties keep the first option tried (alone, then dropped, then smaller groups) and the cheaper end, so
    the result is deterministic.
    """
    original = cost_model.original(num_layers)
    unit = original / UNITS
    limit = math.floor(budget * UNITS + 1e-9) - math.ceil(cost_model.base / unit - 1e-9)
    if limit < 0:
        return None
    inf = math.inf
    # best[i][c][k]: least KL covering layers 0..i-1 having spent c units, k = 1 once a layer is kept
    best = [[[inf, inf] for _ in range(limit + 1)] for _ in range(num_layers + 1)]
    back: list[list[list[tuple[int, int, int] | None]]] = [[[None, None] for _ in range(limit + 1)]
                                                           for _ in range(num_layers + 1)]
    best[0][0][0] = 0.0
    for i in range(num_layers):
        options: list[tuple[int, int, float]] = []  # (size, units, kl); size 0 = dropped
        if "alone" in kinds:
            options.append((1, math.ceil(cost_model.layer / unit - 1e-9), 0.0))
        if "drop" in kinds and i in drops:
            options.append((0, 0, drops[i]))
        if "group" in kinds:
            for size in range(2, max_group_size + 1):
                group = cost_model.group_cost(size, layout)
                if (i, size) in costs and group is not None and i + size <= num_layers:
                    options.append((size, math.ceil(group / unit - 1e-9), costs[(i, size)]))
        for spent in range(limit + 1):
            for kept in (0, 1):
                if best[i][spent][kept] == inf:
                    continue
                for size, units, kl in options:
                    nxt, total, now_kept = i + max(size, 1), spent + units, kept or int(size > 0)
                    if total <= limit and best[i][spent][kept] + kl < best[nxt][total][now_kept]:
                        best[nxt][total][now_kept] = best[i][spent][kept] + kl
                        back[nxt][total][now_kept] = (size, units, kept)
    end = min(range(limit + 1), key=lambda c: (best[num_layers][c][1], c))
    if best[num_layers][end][1] == inf:
        return None  # nothing fits but dropping every layer, which is not a model
    groups, dropped, i, spent, kept = [], [], num_layers, end, 1
    while i > 0:
        size, units, kept_before = back[i][spent][kept]
        width = max(size, 1)
        if size == 0:
            dropped.append(i - 1)
        else:
            groups.append(tuple(range(i - width, i)))
        i, spent, kept = i - width, spent - units, kept_before
    return best[num_layers][end][1], tuple(reversed(groups)), tuple(sorted(dropped))


def choose(parts: Parts, num_layers: int, cost_model: CostModel, budget: float, kind: str,
           max_group_size: int, layout: str = "branches") -> HybridChoice:
    """The least-predicted-KL plan of `kind` within `budget`, over every bypass choice (then smaller d)."""
    if kind not in KINDS:
        raise CqilError(f"plan kind '{kind}' is not one of {', '.join(KINDS)}")
    found = []
    for d in sorted(parts.groups):
        result = best_under_budget(parts.groups[d], parts.drop, num_layers, cost_model, budget, KINDS[kind],
                                   max_group_size, layout)
        if result is not None:
            found.append((result[0], d, result))
        if "group" not in KINDS[kind]:
            break  # the bypass does not matter without groups
    if not found:
        raise CqilError(f"no {kind} plan fits a latency ratio of {budget} under the cost model of "
                        f"'{cost_model.target}': raise --latency-budget")
    _, d, (kl, groups, dropped) = min(found, key=lambda f: (f[0], f[1]))
    plan = from_parallel_groups([list(g) for g in groups if len(g) > 1], num_layers,
                                min(d, max(len(g) for g in groups) - 1), {}, dropped)
    return HybridChoice(groups, dropped, d, kl, cost_model.predicted_ratio(plan, layout))


FRONTIER_BUDGETS = (0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
HYBRID_FORMAT = "cqil-hybrid-search/1"


@dataclass
class HybridResult:
    plan: Plan
    report: dict  # JSON-ready: request, parts, the pick and its held-out measurement
    frontier: dict  # JSON-ready Pareto frontier per kind
    seconds: dict[str, float]


def search(original: CqilModel, calibration: torch.Tensor, held_out: torch.Tensor, cost_model: CostModel,
           budget: float, record: dict, max_group_size: int = 2, bypass_choices: Sequence[int] = (1,),
           layout: str = "branches", head_every: int = 1, batch_size: int = 4,
           frontier_budgets: Sequence[float] = FRONTIER_BUDGETS, progress: bool = True) -> HybridResult:
    """Score parts on `calibration`, pick the hybrid plan within `budget`, and measure it and the frontier of
    every kind (prune-only, CQIL-only, hybrid) at `frontier_budgets` on `held_out`."""
    import time

    from cqil.pipeline.autoplan import score_candidates
    from cqil.pipeline.quality import evaluate

    if not 0 < budget <= 1:
        raise CqilError(f"--latency-budget {budget} must be in (0, 1]: a ratio of the original's decode step")
    layers = original.num_layers
    started = time.perf_counter()
    candidates = score_candidates(original, calibration, max_group_size, bypass_choices, 1.0, batch_size,
                                  progress, head_every)
    parts = parts_from(candidates, score_drops(original, calibration, batch_size, progress, head_every),
                       sorted({min(d, max_group_size - 1) for d in bypass_choices}))
    picked = choose(parts, layers, cost_model, budget, "hybrid", max_group_size, layout)
    scored = time.perf_counter()
    measured: dict[tuple, dict] = {}

    def measure(choice: HybridChoice) -> dict:
        key = (choice.groups, choice.dropped, choice.bypass)
        if key not in measured:
            plan = choice.plan(record, layers)
            result = evaluate(original, {"p": original.with_plan(plan)}, held_out, batch_size, progress)
            measured[key] = {k: _short(result["p"][k]) for k in ("kl", "ppl", "top1")}
            measured[key]["original_ppl"] = _short(result["original"]["ppl"])
        return measured[key]

    frontier: dict[str, list[dict]] = {}
    for kind in KINDS:
        frontier[kind] = []
        for point in sorted(set(frontier_budgets) | {budget}):
            try:
                choice = choose(parts, layers, cost_model, point, kind, max_group_size, layout)
            except CqilError:
                continue
            frontier[kind].append({"budget": point, **_choice_dict(choice), "held_out": measure(choice)})
    latency = {"target": cost_model.target, "budget": budget, "layout": layout,
               "predicted_ratio": _short(picked.predicted_ratio)}
    plan = picked.plan(record, layers)
    plan = Plan(plan.groups, plan.bypass, plan.model, plan.dropped, latency)
    report = {
        "format": HYBRID_FORMAT,
        "request": {"latency_budget": budget, "max_group_size": max_group_size,
                    "bypass_choices": list(bypass_choices), "layout": layout, "head_every": head_every},
        "cost_model": cost_model.to_dict(),
        "prediction": "KL of a plan = sum of its parts' KL alone on calibration text; latency from the cost model",
        "calibration": {"chunks": len(calibration), "tokens": calibration.numel()},
        "held_out": {"chunks": len(held_out), "tokens": held_out.numel()},
        "drop_kl": {str(k): _short(v) for k, v in parts.drop.items()},
        "candidates": [c.to_dict() for c in candidates],
        "plan": plan.to_dict(),
        "predicted_kl": _short(picked.predicted_kl),
        "measured": measure(picked),
    }
    frontier_report = {"format": "cqil-pareto/1", "target": cost_model.target, "layout": layout,
                       "latency": "predicted ratio of the decode step under the cost model",
                       "held_out_tokens": held_out.numel(), "kinds": frontier}
    seconds = {"score": round(scored - started, 1), "measure": round(time.perf_counter() - scored, 1)}
    return HybridResult(plan, report, frontier_report, seconds)


def _choice_dict(choice: HybridChoice) -> dict:
    return {"groups": [list(g) for g in choice.groups if len(g) > 1], "dropped": list(choice.dropped),
            "bypass": choice.bypass, "depth": len(choice.groups), "predicted_kl": _short(choice.predicted_kl),
            "predicted_ratio": _short(choice.predicted_ratio)}


def _short(value: float) -> float:
    return float(f"{value:.6g}")


def save_frontier_chart(frontier: dict, path, title: str) -> None:
    """Held-out KL against the predicted latency ratio, one line per kind of plan (the Pareto frontier)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    styles = {"prune": ("tab:red", "s", "prune only"), "cqil": ("tab:blue", "o", "CQIL only"),
              "hybrid": ("tab:green", "^", "hybrid")}
    for kind, points in frontier["kinds"].items():
        color, marker, label = styles[kind]
        axis.plot([p["predicted_ratio"] for p in points], [p["held_out"]["kl"] for p in points], color=color,
                  marker=marker, label=label)
    axis.set_xlabel(f"predicted decode latency ratio ({frontier['target']})")
    axis.set_ylabel("held-out KL(original || plan)")
    axis.set_yscale("log")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
