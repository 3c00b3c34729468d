"""Hybrid plans under a latency budget: each layer alone, in a CQIL group, or dropped, whichever a target's
cost model (engines/cost_model.py) says buys the least KL for the time saved.

1. Score. Every candidate group (as in pipeline.autoplan) and every layer dropped alone get their calibration KL
   with everything else as in the original, all in one pass over the calibration chunks: the original's stream
   is cached once per batch and each part resumes from it at its first layer. Group sizes that the cost model
   prices at no less than their layers alone are not scored: no pick would contain them.
2. Search. The KL of a plan is predicted as the sum of its parts'. Dynamic programming over the layers, with
   the decode-step cost in whole units of 1/UNITS of the original's step (each part's cost rounded up, so the
   exact prediction never exceeds the budget), keeps the k least-KL layouts per (layer, cost spent): one table
   up to the largest budget answers every smaller one. `kinds` restricts the parts: prune-only (alone or
   dropped), CQIL-only (alone or grouped), hybrid (all three).
3. Verify and repair. Dropped layers' KLs do not add up (two layers whose changes point the same way cost more
   together than apart), so each pick's whole-plan calibration KL is measured. Where it is more than
   REPAIR_MARGIN over the prediction, the next layouts of the DP are measured too (for a hybrid also the best
   pairs around each of the prune-only DP's next drop sets) and the least measured one is kept. A budget also
   keeps what fits a smaller one, and the hybrid what a prune-only or CQIL-only plan reaches, so on calibration
   text the hybrid is never worse than either. All plans of a round are measured in one pass.
4. Measure. Every kind's pick at every frontier budget, and the original once, in one pass over held-out text.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from cqil.engines.cost_model import CostModel
from cqil.model.cqil import CqilModel
from cqil.model.errors import CqilError
from cqil.model.plan import Plan, from_parallel_groups, pruned_plan
from cqil.pipeline.autoplan import Candidate, calibration_kl, group_costs

UNITS = 1000  # cost resolution: 1/UNITS of the original's decode step
KINDS = {"prune": ("alone", "drop"), "cqil": ("alone", "group"), "hybrid": ("alone", "drop", "group")}
FRONTIER_BUDGETS = (0.75, 0.8, 0.85, 0.9, 0.95)
HYBRID_FORMAT = "cqil-hybrid-search/2"
REPAIR_MARGIN = 0.05  # a pick measured more than 5 % over its predicted calibration KL is repaired
REPAIR_TRIES = 4  # layouts measured per repaired pick (the pick included)


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


def plan_bypasses(bypass_choices: Sequence[int], max_group_size: int) -> list[int]:
    """The distinct bypass distances a plan can record: d acts inside groups only."""
    return sorted({min(d, max_group_size - 1) for d in bypass_choices})


def paying_sizes(cost_model: CostModel | None, max_group_size: int, layout: str = "branches") -> list[int]:
    """Group sizes worth scoring: those the cost model prices below their layers alone. A group that costs as
    much as its layers (ONNX Runtime CPU runs the branches one after another) is never in a plan the search
    picks: its layers alone cost no more and lose no KL."""
    return [size for size in range(2, max_group_size + 1) if cost_model is None or (
        (cost := cost_model.group_cost(size, layout)) is not None and cost < size * cost_model.layer)]


def score_parts(original: CqilModel, chunks: torch.Tensor, max_group_size: int, bypass_choices: Sequence[int],
                batch_size: int = 4, progress: bool = True, head_every: int = 1,
                sizes: Sequence[int] | None = None) -> tuple[list[Candidate], Parts]:
    """Every candidate group (autoplan's table) and every layer dropped alone, scored in one calibration pass:
    the original's stream is computed once per batch for all of them. Groups of a size not in `sizes`
    (default: all) are listed unscored (KL None) and never used."""
    from cqil.pipeline.analysis import layer_input_similarity

    layers = original.num_layers
    sizes = range(2, max_group_size + 1) if sizes is None else sizes
    similarity = layer_input_similarity(original, chunks, batch_size, progress)
    keys = [(s, size, d) for size in range(2, max_group_size + 1) for s in range(layers - size + 1)
            for d in sorted({min(d, size - 1) for d in bypass_choices})]
    scored = [key for key in keys if key[1] in sizes]
    plans = [from_parallel_groups([list(range(s, s + size))], layers, d) for s, size, d in scored]
    plans += [pruned_plan([layer], layers) for layer in range(layers)]
    kls = calibration_kl(original, plans, chunks, batch_size, progress, head_every)
    by_key = dict(zip(scored, kls))
    candidates = [Candidate(s, size, d, float(similarity[s, s + size - 1]), by_key.get((s, size, d)))
                  for s, size, d in keys]
    drops = dict(enumerate(kls[len(scored):]))
    return candidates, parts_from(candidates, drops, plan_bypasses(bypass_choices, max_group_size))


# -- the DP: k least-KL layouts per decode-step cost ---------------------------------------------------

Layout = tuple[float, tuple[tuple[int, ...], ...], tuple[int, ...]]  # (predicted KL, groups, dropped)


class LayoutTable:
    """The k least-predicted-KL layouts of one kind (one bypass d) for every decode-step cost up to `max_budget`.

    `fixed_drops`: exactly these layers are dropped (the rest alone or grouped). Ties keep the first layout
    found (alone, then dropped, then smaller groups) and then the cheaper one, so results are deterministic.
    """

    def __init__(self, costs: dict[tuple[int, int], float], drops: dict[int, float], num_layers: int,
                 cost_model: CostModel, kinds: Sequence[str], max_group_size: int, max_budget: float,
                 layout: str = "branches", k: int = 1, fixed_drops: frozenset[int] | None = None):
        self.unit = cost_model.original(num_layers) / UNITS
        self.base_units = math.ceil(cost_model.base / self.unit - 1e-9)
        self.ends: list[tuple[int, Layout]] = []  # (units spent on the layers, layout)
        limit = self.limit(max_budget)
        if limit < 0:
            return

        def units(seconds: float) -> int:
            return math.ceil(seconds / self.unit - 1e-9)

        def options(i: int) -> list[tuple[int, int, float]]:  # (size, units, kl); size 0 = dropped
            if fixed_drops is not None and i in fixed_drops:
                return [(0, 0, drops[i])] if i in drops else []
            found = [(1, units(cost_model.layer), 0.0)] if "alone" in kinds else []
            if "drop" in kinds and fixed_drops is None and i in drops:
                found.append((0, 0, drops[i]))
            if "group" in kinds:
                for size in range(2, min(max_group_size, num_layers - i) + 1):
                    group = cost_model.group_cost(size, layout)
                    if (i, size) in costs and group is not None and not (
                            fixed_drops and fixed_drops.intersection(range(i, i + size))):
                        found.append((size, units(group), costs[(i, size)]))
            return found

        # table[i][(spent, kept)]: up to k entries (kl, size, units, kept before, rank before), best first;
        # kept = 1 once a layer is kept (dropping every layer is not a model)
        table: list[dict[tuple[int, int], list]] = [{} for _ in range(num_layers + 1)]
        table[0][(0, 0)] = [(0.0, 0, 0, 0, -1)]
        for i in range(num_layers + 1):
            for entries in table[i].values():
                entries.sort(key=lambda e: e[0])  # stable: the first found wins a tie
                del entries[k:]
            if i == num_layers:
                break
            for size, cost, kl in options(i):
                nxt = i + max(size, 1)
                for (spent, kept), entries in table[i].items():
                    if spent + cost > limit:
                        continue
                    bucket = table[nxt].setdefault((spent + cost, kept or int(size > 0)), [])
                    bucket.extend((e[0] + kl, size, cost, kept, rank) for rank, e in enumerate(entries))
        for (spent, kept), entries in sorted(table[num_layers].items()):
            if kept:
                self.ends += [(spent, self._layout(table, num_layers, spent, rank)) for rank in range(len(entries))]

    def limit(self, budget: float) -> int:
        """Units the layers may spend within `budget` (negative: not even the base fits)."""
        return math.floor(budget * UNITS + 1e-9) - self.base_units

    @staticmethod
    def _layout(table, num_layers: int, spent: int, rank: int) -> Layout:
        kl = table[num_layers][(spent, 1)][rank][0]
        groups, dropped, i, kept = [], [], num_layers, 1
        while i > 0:
            _, size, cost, kept_before, rank_before = table[i][(spent, kept)][rank]
            width = max(size, 1)
            if size == 0:
                dropped.append(i - 1)
            else:
                groups.append(tuple(range(i - width, i)))
            i, spent, kept, rank = i - width, spent - cost, kept_before, rank_before
        return kl, tuple(reversed(groups)), tuple(sorted(dropped))

    def within(self, budget: float, k: int = 1) -> list[Layout]:
        """The k least-KL layouts whose predicted ratio is <= `budget` (<= the table's budget), best first."""
        limit = self.limit(budget)
        fitting = sorted((e for e in self.ends if e[0] <= limit), key=lambda e: (e[1][0], e[0]))
        return [layout for _, layout in fitting[:k]]


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

    @property
    def key(self) -> tuple:
        """What the plan is (the bypass only matters where a group has more than one layer)."""
        return self.groups, self.dropped, min(self.bypass, max(len(g) for g in self.groups) - 1)


def as_choice(layout: Layout, d: int, num_layers: int, cost_model: CostModel, style: str) -> HybridChoice:
    kl, groups, dropped = layout
    choice = HybridChoice(groups, dropped, d, kl, 0.0)
    return HybridChoice(groups, dropped, d, kl, cost_model.predicted_ratio(choice.plan({}, num_layers), style))


def tables(parts: Parts, num_layers: int, cost_model: CostModel, max_budget: float, kind: str, max_group_size: int,
           layout: str = "branches", k: int = 1, fixed_drops: frozenset[int] | None = None) -> dict[int, LayoutTable]:
    """One LayoutTable per bypass d (one only without groups: the bypass does not matter then)."""
    if kind not in KINDS:
        raise CqilError(f"plan kind '{kind}' is not one of {', '.join(KINDS)}")
    choices = sorted(parts.groups) if "group" in KINDS[kind] else sorted(parts.groups)[:1] or [0]
    return {d: LayoutTable(parts.groups.get(d, {}), parts.drop, num_layers, cost_model, KINDS[kind], max_group_size,
                           max_budget, layout, k, fixed_drops) for d in choices}


def ranked(by_d: dict[int, LayoutTable], budget: float, k: int, num_layers: int, cost_model: CostModel,
           layout: str = "branches") -> list[HybridChoice]:
    """The k least-predicted-KL distinct plans within `budget` over every bypass d (then the smaller d)."""
    found = sorted(((lay[0], d, i, lay) for d, table in by_d.items() for i, lay in enumerate(table.within(budget, k))),
                   key=lambda f: f[:3])
    out: dict[tuple, HybridChoice] = {}
    for _, d, _, lay in found:
        choice = as_choice(lay, d, num_layers, cost_model, layout)
        out.setdefault(choice.key, choice)
    return list(out.values())[:k]


def choose(parts: Parts, num_layers: int, cost_model: CostModel, budget: float, kind: str,
           max_group_size: int, layout: str = "branches") -> HybridChoice:
    """The least-predicted-KL plan of `kind` within `budget`, over every bypass choice (then smaller d)."""
    found = ranked(tables(parts, num_layers, cost_model, budget, kind, max_group_size, layout), budget, 1,
                   num_layers, cost_model, layout)
    if not found:
        raise CqilError(f"no {kind} plan fits a latency ratio of {budget} under the cost model of "
                        f"'{cost_model.target}': raise --latency-budget")
    return found[0]


# -- verify and repair ---------------------------------------------------------------------------------

@dataclass
class Verified:
    """A frontier point after repair: the plan kept, its measured calibration KL, and what was measured."""

    choice: HybridChoice
    measured_kl: float
    source: str  # "prediction", "repair", "smaller budget", "prune", "cqil"
    tried: list[tuple[HybridChoice, float]] = field(default_factory=list)


def verify_frontier(parts: Parts, num_layers: int, cost_model: CostModel, budgets: Sequence[float],
                    max_group_size: int, measure, layout: str = "branches", margin: float = REPAIR_MARGIN,
                    tries: int = REPAIR_TRIES) -> dict[str, dict[float, Verified]]:
    """Every kind's plan at every budget, verified on calibration text (module docstring, step 3).

    `measure(plans)` -> their whole-plan calibration KLs (one pass); each distinct plan is measured once.
    """
    top = max(budgets)
    by_kind = {kind: tables(parts, num_layers, cost_model, top, kind, max_group_size, layout, tries) for kind in KINDS}
    lists = {kind: {b: ranked(by_kind[kind], b, tries, num_layers, cost_model, layout) for b in budgets}
             for kind in KINDS}
    measured: dict[tuple, float] = {}

    def run(choices: list[HybridChoice]) -> None:
        new = list({c.key: c for c in choices if c.key not in measured}.values())
        for choice, kl in zip(new, measure([c.plan({}, num_layers) for c in new]) if new else []):
            measured[choice.key] = kl

    run([found[0] for kind in KINDS for found in lists[kind].values() if found])
    alternatives: dict[tuple[str, float], list[HybridChoice]] = {}
    for kind in KINDS:
        for b, found in lists[kind].items():
            if found and measured[found[0].key] > found[0].predicted_kl * (1 + margin) + 1e-9:
                alternatives[(kind, b)] = _alternatives(kind, b, found, lists, parts, num_layers, cost_model,
                                                        max_group_size, layout, tries)
    run([c for found in alternatives.values() for c in found])
    result: dict[str, dict[float, Verified]] = {}
    for kind in KINDS:  # prune and cqil before hybrid, which may take theirs
        result[kind] = {}
        for b in sorted(budgets):
            found = lists[kind][b]
            tried = [(c, measured[c.key]) for c in found[:1] + alternatives.get((kind, b), [])]
            pool = [(kl, "prediction" if i == 0 else "repair", c) for i, (c, kl) in enumerate(tried)]
            pool += [(v.measured_kl, "smaller budget", v.choice) for s, v in result[kind].items() if s < b]
            if kind == "hybrid":
                pool += [(result[other][b].measured_kl, other, result[other][b].choice) for other in ("prune", "cqil")
                         if b in result[other]]
            if pool:
                kl, source, choice = min(pool, key=lambda p: p[0])  # min keeps the first of equals
                result[kind][b] = Verified(choice, kl, source, tried)
    return result


def _alternatives(kind: str, budget: float, found: list[HybridChoice], lists, parts: Parts, num_layers: int,
                  cost_model: CostModel, max_group_size: int, layout: str, tries: int) -> list[HybridChoice]:
    """The layouts to measure after a pick that measured worse than predicted: the DP's next ones; for a hybrid,
    the best grouping around each other drop set among its and the prune-only DP's next layouts (dropped
    layers are where the prediction goes wrong)."""
    if kind != "hybrid":
        return found[1:tries]
    drop_sets = list(dict.fromkeys(frozenset(c.dropped) for c in found + lists["prune"][budget]))
    completed = []
    for dropped in drop_sets:
        if dropped == frozenset(found[0].dropped):
            continue
        by_d = tables(parts, num_layers, cost_model, budget, kind, max_group_size, layout, 1, dropped)
        completed += ranked(by_d, budget, 1, num_layers, cost_model, layout)
    return sorted(completed, key=lambda c: c.predicted_kl)[:tries - 1]


# -- the whole search ----------------------------------------------------------------------------------

@dataclass
class HybridResult:
    plan: Plan
    report: dict  # JSON-ready: request, parts, the pick and its held-out measurement
    frontier: dict  # JSON-ready Pareto frontier per kind
    seconds: dict[str, float]
    plans: dict[str, Plan] = field(default_factory=dict)  # every frontier plan by its point's name


def search(original: CqilModel, calibration: torch.Tensor, held_out: torch.Tensor, cost_model: CostModel,
           budget: float, record: dict, max_group_size: int = 2, bypass_choices: Sequence[int] = (1,),
           layout: str = "branches", head_every: int = 1, batch_size: int = 4,
           frontier_budgets: Sequence[float] = FRONTIER_BUDGETS, progress: bool = True,
           margin: float = REPAIR_MARGIN, tries: int = REPAIR_TRIES) -> HybridResult:
    """Score parts on `calibration`, pick and verify every kind's plan at `budget` and `frontier_budgets`, and
    measure them all on `held_out` in one pass; the hybrid plan at `budget` is the result."""
    from cqil.pipeline.quality import evaluate

    if not 0 < budget <= 1:
        raise CqilError(f"--latency-budget {budget} must be in (0, 1]: a ratio of the original's decode step")
    layers = original.num_layers
    started = time.perf_counter()
    sizes = paying_sizes(cost_model, max_group_size, layout)
    candidates, parts = score_parts(original, calibration, max_group_size, bypass_choices, batch_size, progress,
                                    head_every, sizes)
    scored = time.perf_counter()
    budgets = sorted(set(frontier_budgets) | {budget})

    def measure(plans: list[Plan]) -> list[float]:
        return calibration_kl(original, plans, calibration, batch_size, progress, head_every)

    points = verify_frontier(parts, layers, cost_model, budgets, max_group_size, measure, layout, margin, tries)
    if budget not in points["hybrid"]:
        raise CqilError(f"no plan fits a latency ratio of {budget} under the cost model of "
                        f"'{cost_model.target}': raise --latency-budget")
    verified = time.perf_counter()
    plans = {f"{kind}@{b}": v.choice.plan(record, layers) for kind in KINDS for b, v in points[kind].items()}
    names = {}  # one name per distinct plan: each is evaluated once
    for name, plan in plans.items():
        names.setdefault((plan.groups, plan.dropped, plan.bypass), name)
    result = evaluate(original, {name: original.with_plan(plans[name]) for name in names.values()}, held_out,
                      batch_size, progress)
    held = {name: {**{k: _short(result[names[(p.groups, p.dropped, p.bypass)]][k]) for k in ("kl", "ppl", "top1")},
                   "original_ppl": _short(result["original"]["ppl"])} for name, p in plans.items()}
    frontier = {kind: [{"budget": b, **_point_dict(v), "held_out": held[f"{kind}@{b}"]} for b, v in found.items()]
                for kind, found in points.items()}
    picked = points["hybrid"][budget]
    latency = {"target": cost_model.target, "budget": budget, "layout": layout,
               "predicted_ratio": _short(picked.choice.predicted_ratio)}
    plan = plans[f"hybrid@{budget}"]
    plan = Plan(plan.groups, plan.bypass, plan.model, plan.dropped, latency)
    report = {
        "format": HYBRID_FORMAT,
        "request": {"latency_budget": budget, "max_group_size": max_group_size,
                    "bypass_choices": list(bypass_choices), "layout": layout, "head_every": head_every,
                    "repair_margin": margin, "repair_tries": tries},
        "cost_model": cost_model.to_dict(),
        "prediction": "KL of a plan = sum of its parts' KL alone on calibration text; latency from the cost model; "
                      "each pick's whole-plan calibration KL measured, and repaired when over the prediction",
        "calibration": {"chunks": len(calibration), "tokens": calibration.numel()},
        "held_out": {"chunks": len(held_out), "tokens": held_out.numel()},
        "scored_group_sizes": sizes,  # the others cost at least their layers alone on this target: never picked
        "drop_kl": {str(k): _short(v) for k, v in parts.drop.items()},
        "candidates": [c.to_dict() for c in candidates],
        "plan": plan.to_dict(),
        **_point_dict(picked),
        "measured": held[f"hybrid@{budget}"],
    }
    frontier_report = {"format": "cqil-pareto/2", "target": cost_model.target, "layout": layout,
                       "latency": "predicted_ratio: decode step under the cost model over the original's; "
                                  "measured_ratio: both exported and timed, where measured",
                       "calibration_tokens": calibration.numel(), "held_out_tokens": held_out.numel(),
                       "kinds": frontier}
    seconds = {"score": round(scored - started, 1), "verify": round(verified - scored, 1),
               "measure": round(time.perf_counter() - verified, 1)}
    return HybridResult(plan, report, frontier_report, seconds, plans)


def add_measured_latency(result: HybridResult, original: CqilModel, cost_model: CostModel, repeats: int,
                         layout: str, workdir, progress: bool = True) -> None:
    """Export every distinct frontier plan and time its decode step against the original's on the cost model's
    target (ONNX Runtime CPU, its threads and past length); each point and the plan's `latency` get
    `measured_ratio` beside `predicted_ratio`. Other targets are refused: measuring plans there is not built."""
    from cqil.engines.cost_model import ONNX_CPU, CostSettings, measure_plan_ratios

    if cost_model.engine != ONNX_CPU:
        raise CqilError(f"--measure-latency times plans on ONNX Runtime CPU, and the cost model was measured on "
                        f"'{cost_model.target}': leave --measure-latency out")
    names: dict[tuple, str] = {}
    for name, plan in result.plans.items():
        names.setdefault((plan.groups, plan.dropped, plan.bypass), name)
    settings = CostSettings(past=int(cost_model.details.get("past", 128)), repeats=repeats,
                            threads=cost_model.details.get("threads"))
    distinct = {name: result.plans[name] for name in names.values()}
    timed = measure_plan_ratios(original, distinct, layout, settings, workdir, progress)
    for kind, points in result.frontier["kinds"].items():
        for point in points:
            plan = result.plans[f"{kind}@{point['budget']}"]
            point.update(timed[names[(plan.groups, plan.dropped, plan.bypass)]])
    result.frontier["measured_latency"] = {"engine": ONNX_CPU, "plans": len(distinct), "past": settings.past,
                                           "repeats": repeats,
                                           "threads": settings.threads, "reference": "the original, same rounds"}
    budget = result.report["request"]["latency_budget"]
    picked = next(p for p in result.frontier["kinds"]["hybrid"] if p["budget"] == budget)
    result.plan.latency["measured_ratio"] = picked["measured_ratio"]
    result.report["plan"] = result.plan.to_dict()


def _choice_dict(choice: HybridChoice) -> dict:
    return {"groups": [list(g) for g in choice.groups if len(g) > 1], "dropped": list(choice.dropped),
            "bypass": choice.bypass, "depth": len(choice.groups), "predicted_kl": _short(choice.predicted_kl),
            "predicted_ratio": _short(choice.predicted_ratio)}


def _point_dict(point: Verified) -> dict:
    return {**_choice_dict(point.choice), "calibration_kl": _short(point.measured_kl), "source": point.source,
            "tried": [{"groups": [list(g) for g in c.groups if len(g) > 1], "dropped": list(c.dropped),
                       "predicted_kl": _short(c.predicted_kl), "calibration_kl": _short(kl)} for c, kl in point.tried]}


def _short(value: float) -> float:
    return float(f"{value:.6g}")


def save_frontier_chart(frontier: dict, path, title: str) -> None:
    """Held-out KL against the latency ratio, one colour per kind of plan: predicted ratios as hollow markers on
    dashed lines, measured ones (where the frontier carries them) as filled markers on solid lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7.2, 4.6), dpi=120)
    styles = {"prune": ("tab:red", "s", "prune only"), "cqil": ("tab:blue", "o", "CQIL only"),
              "hybrid": ("tab:green", "^", "hybrid")}
    for kind, points in frontier["kinds"].items():
        color, marker, label = styles[kind]
        if not points:
            axis.plot([], [], color=color, marker=marker, linestyle="none", label=f"{label}: no plan fits")
            continue
        kl = [p["held_out"]["kl"] for p in points]
        axis.plot([p["predicted_ratio"] for p in points], kl, color=color, marker=marker, markerfacecolor="none",
                  linestyle="--", label=f"{label}, predicted")
        measured = [(p["measured_ratio"], p["held_out"]["kl"]) for p in points if "measured_ratio" in p]
        if measured:
            axis.plot(*zip(*measured), color=color, marker=marker, label=f"{label}, measured")
    for budget in sorted({p["budget"] for points in frontier["kinds"].values() for p in points}):
        axis.axvline(budget, color="0.85", linewidth=0.8, zorder=0)
    axis.set_xlabel(f"decode latency ratio to the original ({frontier['target']})")
    axis.set_ylabel("held-out KL(original || plan)")
    axis.set_yscale("log")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8)
    axis.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
