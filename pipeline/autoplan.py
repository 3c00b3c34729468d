"""Automatic CQIL plans: pick the groups (and bypass distance) under a depth target or a KL budget.

Which layers end up grouped matters as much as how many, so the search measures every candidate
group instead of trusting a uniform S:E:P rule:

1. Score. Every run of 2..P consecutive layers, under each bypass choice, is applied *alone* (all
   other layers single) and its mean KL(original || candidate) is measured on calibration text.
   A group alone only changes the residual stream from its first layer on, so each candidate
   resumes from the original's cached stream at that layer. The KL may be taken at every k-th position
   only (the LM head of a small model costs as much as many layers; the ranking holds, docs/autoplan.md).
   Optionally only the candidates whose first and last layer inputs are most alike (pipeline.analysis)
   are measured; the rest are never used.
2. Search. Assuming the KL of groups adds up, dynamic programming over consecutive groups finds, for
   every depth, the partition with the least predicted KL; a depth target takes that depth, a budget
   the shallowest depth whose prediction fits.
3. Verify. The chosen plan is evaluated for real on held-out text (pipeline.quality.evaluate). Over a
   budget, the group whose split saves the most predicted KL is split (depth + 1) and the plan is
   evaluated again, until it fits (the all-single plan is the original model, KL 0).

Cost: with L layers, P the largest group and D bypass choices there are about D*(P-1)*L candidates,
each running the layers after its start and the LM head: O(D*P*L^2) layer forwards and O(D*P*L)
head forwards per calibration token, plus one original forward to cache. The DP is O(D*P*L^2)
arithmetic; verification is one held-out evaluation per repair step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from cqil.model.cqil import CqilModel
from cqil.model.divergence import token_kl
from cqil.model.errors import CqilError
from cqil.model.plan import Plan, from_parallel_groups, uniform_plan
from tqdm import tqdm

SEARCH_FORMAT = "cqil-plan-search/1"
Groups = tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class SearchRequest:
    """What the user asked for: exactly one of `target_depth` and `max_kl`."""

    target_depth: int | None = None
    max_kl: float | None = None
    max_group_size: int = 2
    bypass_choices: tuple[int, ...] = (0, 1)
    proxy_keep: float = 1.0
    head_every: int = 1  # score KL at every k-th position only (the LM head is ~8 layers' work per token)

    def check(self, num_layers: int) -> None:
        """Refuse a request no plan can meet, before any forward pass."""
        if (self.target_depth is None) == (self.max_kl is None):
            raise CqilError("cqil plan --auto needs exactly one of --target-depth N and --max-kl X")
        size = self.max_group_size
        if not 2 <= size <= num_layers:
            raise CqilError(f"--max-group-size {size} must be in 2..{num_layers} (this model's layers)")
        if not self.bypass_choices:
            raise CqilError("--bypass-choices is empty: write e.g. --bypass-choices 0,1")
        for d in self.bypass_choices:
            if not 0 <= d <= size - 1:
                raise CqilError(f"bypass choice {d} does not fit groups of at most {size} layers: "
                                f"use values in 0..{size - 1} or raise --max-group-size")
        if not 0 < self.proxy_keep <= 1:
            raise CqilError(f"--proxy-keep {self.proxy_keep} must be in (0, 1]")
        if self.head_every < 1:
            raise CqilError(f"--head-every {self.head_every} must be at least 1 (1 = every position)")
        if self.target_depth is not None:
            least = math.ceil(num_layers / size)
            if not least <= self.target_depth <= num_layers:
                raise CqilError(
                    f"--target-depth {self.target_depth} is impossible for {num_layers} layers in groups "
                    f"of at most {size}: use {least}..{num_layers} or raise --max-group-size"
                )
        if self.max_kl is not None and not self.max_kl > 0:
            raise CqilError(f"--max-kl {self.max_kl} must be a positive KL (nats per token), e.g. 0.05")


def parse_bypass_choices(spec: str) -> tuple[int, ...]:
    """`0,1` -> (0, 1), sorted and without repeats."""
    try:
        values = {int(part) for part in spec.split(",") if part.strip()}
    except ValueError:
        raise CqilError(f"--bypass-choices '{spec}' is not a comma list of integers, e.g. 0,1") from None
    if not values:
        raise CqilError("--bypass-choices is empty: write e.g. --bypass-choices 0,1")
    return tuple(sorted(values))


@dataclass(frozen=True)
class Candidate:
    """One group applied alone: its layers, bypass distance inside it, proxy and measured KL."""

    start: int
    size: int
    bypass: int  # effective distance inside this group: min(d, size - 1)
    similarity: float  # cosine similarity of the inputs of its first and last layer
    kl: float | None  # mean KL to the original on calibration text; None when pruned

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(range(self.start, self.start + self.size))

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "bypass": self.bypass, "similarity": _short(self.similarity),
                "kl": None if self.kl is None else _short(self.kl)}


def _short(value: float) -> float:
    return float(f"{value:.6g}")


# -- measuring KL on calibration text, resuming from the original's residual stream ---------------

def scored_positions(head_every: int) -> slice:
    """Every `head_every`-th position, ending on the last one of a chunk when the length allows."""
    return slice(head_every - 1, None, head_every)


@torch.no_grad()
def calibration_kl(original: CqilModel, plans: Sequence[Plan], chunks: torch.Tensor, batch_size: int = 4,
                   progress: bool = True, head_every: int = 1) -> list[float]:
    """Mean per-token KL(original || plan) on `chunks` for each plan, as pipeline.quality defines it.

    Layers before a plan's first parallel group or dropped layer are single, so its stream there is the
    original's: each plan resumes from the cached original stream at that layer instead of starting over. With
    `head_every` k > 1 only every k-th position goes through the LM head (the layers still see every
    token, so each scored position has its full context): the mean over those positions.
    """
    if len(chunks) == 0:
        raise CqilError("no calibration chunks: give more text with --data or raise --max-chunks")
    positions = scored_positions(head_every)
    models = [original.with_plan(plan) for plan in plans]
    resumes = [resume_point(plan) for plan in plans]
    totals = [0.0] * len(plans)
    scored = 0
    batches = torch.split(chunks, batch_size)
    bar = tqdm(total=len(batches) * len(plans), desc="score", unit="plan", disable=not progress, leave=False)
    for batch in batches:
        hidden, step, reference = original_pass(original, batch, positions)
        scored += reference.shape[0] * reference.shape[1]
        for index, (model, resume) in enumerate(zip(models, resumes)):
            if resume is not None:
                layer, first = resume
                log_probs = run_from(model, first, hidden[layer], step, positions)
                totals[index] += float(token_kl(reference, log_probs).double().sum())
            bar.update()
    bar.close()
    return [total / scored for total in totals]


def resume_point(plan: Plan) -> tuple[int, int] | None:
    """(layer, group index) where a plan's stream first leaves the original's: the stream entering that layer
    is the original's, and the plan's groups from that index on run after it. None: the original model."""
    changes = [group[0] for group in plan.groups if len(group) > 1][:1] + list(plan.dropped[:1])
    if not changes:
        return None
    layer = min(changes)
    return layer, next((i for i, group in enumerate(plan.groups) if group[0] >= layer), len(plan.groups))


def run_from(model: CqilModel, first: int, x: torch.Tensor, step, positions: slice) -> torch.Tensor:
    """Groups `first`.. of `model` on stream x (no cache), then the head: log-probabilities at `positions`."""
    for group_index in range(first, len(model.plan.groups)):
        x, _ = model.run_group(group_index, x, step, [None] * len(model.plan.groups[group_index]))
    return F.log_softmax(model.head(x[:, positions]).float(), -1)


def original_pass(original: CqilModel, batch: torch.Tensor, positions: slice = slice(None)):
    """The original's stream entering every layer (and leaving the last), the step inputs, and its
    log-probabilities at `positions`."""
    x, step = original.prologue(batch, torch.ones_like(batch))
    hidden = [x]
    for layer in range(original.num_layers):
        x, _ = original.run_group(layer, x, step, [None])
        hidden.append(x)
    reference = F.log_softmax(original.head(x[:, positions]).float(), -1)
    return hidden, step, reference


# -- step 1: candidates ---------------------------------------------------------------------------

def score_candidates(original: CqilModel, chunks: torch.Tensor, max_group_size: int,
                     bypass_choices: Sequence[int], proxy_keep: float = 1.0, batch_size: int = 4,
                     progress: bool = True, head_every: int = 1) -> list[Candidate]:
    """Every run of 2..max_group_size layers under each distinct effective bypass, with its KL alone."""
    from cqil.pipeline.analysis import layer_input_similarity

    layers = original.num_layers
    similarity = layer_input_similarity(original, chunks, batch_size, progress)
    kept: list[tuple[int, int]] = []
    for size in range(2, max_group_size + 1):
        starts = sorted(range(layers - size + 1), key=lambda s: (-float(similarity[s, s + size - 1]), s))
        kept += [(s, size) for s in starts[:math.ceil(proxy_keep * len(starts))]]
    kept_set = set(kept)
    keys = [(s, size, d) for size in range(2, max_group_size + 1) for s in range(layers - size + 1)
            for d in sorted({min(d, size - 1) for d in bypass_choices})]
    measured = [key for key in keys if key[:2] in kept_set]
    plans = [from_parallel_groups([list(range(s, s + size))], layers, d) for s, size, d in measured]
    kls = dict(zip(measured, calibration_kl(original, plans, chunks, batch_size, progress, head_every)))
    return [Candidate(s, size, d, float(similarity[s, s + size - 1]), kls.get((s, size, d)))
            for s, size, d in keys]


def group_costs(candidates: Sequence[Candidate], bypass: int) -> dict[tuple[int, int], float]:
    """(start, size) -> measured KL alone under plan bypass `bypass`; pruned candidates left out."""
    return {(c.start, c.size): c.kl for c in candidates
            if c.kl is not None and c.bypass == min(bypass, c.size - 1)}


# -- step 2: dynamic programming ------------------------------------------------------------------

def best_by_depth(costs: dict[tuple[int, int], float], num_layers: int,
                  max_group_size: int) -> dict[int, tuple[float, Groups]]:
    """For every reachable depth, the partition into consecutive groups with the least summed cost.

    Single layers cost 0; a group of 2+ layers costs `costs[(start, size)]` and is unusable if absent.
    Ties keep the first partition found with the smaller last group, so the result is deterministic.
    """
    inf = math.inf
    # best[k][i]: least cost of covering layers 0..i-1 with k groups; back[k][i]: size of the last group
    best = [[inf] * (num_layers + 1) for _ in range(num_layers + 1)]
    back = [[0] * (num_layers + 1) for _ in range(num_layers + 1)]
    best[0][0] = 0.0
    for k in range(1, num_layers + 1):
        for i in range(k, num_layers + 1):
            for size in range(1, min(max_group_size, i) + 1):
                step = 0.0 if size == 1 else costs.get((i - size, size), inf)
                value = best[k - 1][i - size] + step
                if value < best[k][i]:
                    best[k][i], back[k][i] = value, size
    result = {}
    for k in range(1, num_layers + 1):
        if best[k][num_layers] < inf:
            groups, i = [], num_layers
            for depth in range(k, 0, -1):
                size = back[depth][i]
                groups.append(tuple(range(i - size, i)))
                i -= size
            result[k] = (best[k][num_layers], tuple(reversed(groups)))
    return result


@dataclass(frozen=True)
class Choice:
    groups: Groups
    bypass: int
    predicted_kl: float

    @property
    def plan_bypass(self) -> int:
        """The bypass the plan records: d acts inside groups only, so it is capped at the largest - 1."""
        return min(self.bypass, max(len(g) for g in self.groups) - 1)

    def plan(self, model_record: dict) -> Plan:
        return Plan(self.groups, self.plan_bypass, model_record)


def select(candidates: Sequence[Candidate], request: SearchRequest, num_layers: int) -> Choice:
    """The DP's pick over all bypass choices: the requested depth with least predicted KL, or the
    shallowest depth whose predicted KL fits the budget (then least KL, then smaller bypass)."""
    options: list[tuple[int, float, int, Groups]] = []
    for d in request.bypass_choices:
        frontier = best_by_depth(group_costs(candidates, d), num_layers, request.max_group_size)
        for depth, (cost, groups) in frontier.items():
            if request.target_depth is not None and depth != request.target_depth:
                continue
            if request.max_kl is not None and cost > request.max_kl:
                continue
            options.append((depth, cost, d, groups))
    if not options:
        raise CqilError(f"no plan of depth {request.target_depth} can be built from the measured candidates: "
                        "raise --proxy-keep (fewer candidates pruned) or the depth")
    _, cost, d, groups = min(options, key=lambda o: o[:3])
    return Choice(groups, d, cost)


# -- step 3: verify and repair --------------------------------------------------------------------

def predicted_kl(groups: Groups, costs: dict[tuple[int, int], float]) -> float:
    return sum(costs[(g[0], len(g))] for g in groups if len(g) > 1)


def split_costliest(choice: Choice, costs: dict[tuple[int, int], float]) -> Choice:
    """One group split in two (depth + 1): the split that lowers the predicted KL the most.

    A part whose candidate was pruned is not allowed; if that rules out every two-way split, the
    costliest group is broken into single layers instead.
    """
    options: list[Groups] = []
    for index, group in enumerate(choice.groups):
        for cut in range(1, len(group)):
            parts = (group[:cut], group[cut:])
            if all(len(p) == 1 or (p[0], len(p)) in costs for p in parts):
                options.append(choice.groups[:index] + parts + choice.groups[index + 1:])
    if not options:
        for index, group in enumerate(choice.groups):
            if len(group) > 1:
                singles = tuple((layer,) for layer in group)
                options.append(choice.groups[:index] + singles + choice.groups[index + 1:])
    groups = min(options, key=lambda g: predicted_kl(g, costs))  # min keeps the first of equals
    return Choice(groups, choice.bypass, predicted_kl(groups, costs))


def repair(choice: Choice, costs: dict[tuple[int, int], float], measure: Callable[[Choice], float],
           budget: float) -> list[tuple[Choice, float]]:
    """Measure `choice`; while over `budget`, split a group and measure again. Returns every step;
    the last one fits (the all-single plan, the original model, always does)."""
    steps = [(choice, measure(choice))]
    while steps[-1][1] > budget and max(len(g) for g in steps[-1][0].groups) > 1:
        choice = split_costliest(steps[-1][0], costs)
        steps.append((choice, measure(choice)))
    return steps


# -- the whole search ---------------------------------------------------------------------------

def uniform_of_depth(num_layers: int, depth: int, group_size: int, bypass: int,
                     model_record: dict | None = None) -> tuple[str, Plan] | None:
    """The paper-style plan S:L:P (groups of `group_size` up to the last layer) with `depth` groups and
    the smallest S, named by its spec: what a user would have picked by hand, to compare the search with."""
    for start in range(num_layers - 1):
        plan = uniform_plan(start, num_layers, group_size, num_layers, min(bypass, group_size - 1), model_record)
        if plan.depth == depth:
            return f"{start}:{num_layers}:{group_size}", plan
    return None


@dataclass
class SearchResult:
    plan: Plan
    report: dict  # JSON-ready: the request, the candidate table, the DP pick and every verification
    seconds: dict[str, float]  # wall time of scoring and of verification (kept out of the report's bytes)


def search(original: CqilModel, calibration: torch.Tensor, held_out: torch.Tensor, request: SearchRequest,
           model_record: dict, batch_size: int = 4, progress: bool = True) -> SearchResult:
    """Score candidates on `calibration`, pick a plan by DP, verify (and repair) it on `held_out`."""
    from cqil.pipeline.quality import evaluate

    layers = original.num_layers
    request.check(layers)
    started = time.perf_counter()
    candidates = score_candidates(original, calibration, request.max_group_size, request.bypass_choices,
                                  request.proxy_keep, batch_size, progress, request.head_every)
    choice = select(candidates, request, layers)
    scored = time.perf_counter()
    measured: dict[Groups, dict] = {}

    def measure(step: Choice) -> float:
        plan = step.plan(model_record)
        result = evaluate(original, {"auto": original.with_plan(plan)}, held_out, batch_size, progress)
        measured[step.groups] = {"original_ppl": result["original"]["ppl"], **result["auto"]}
        return result["auto"]["kl"]

    costs = group_costs(candidates, choice.bypass)
    budget = request.max_kl if request.max_kl is not None else math.inf
    steps = repair(choice, costs, measure, budget)
    final = steps[-1][0]
    plan = final.plan(model_record)
    report = {
        "format": SEARCH_FORMAT,
        "request": {"target_depth": request.target_depth, "max_kl": request.max_kl,
                    "max_group_size": request.max_group_size, "bypass_choices": list(request.bypass_choices),
                    "proxy_keep": request.proxy_keep, "head_every": request.head_every},
        "cost_model": "predicted KL of a plan = sum of the KL of each of its groups applied alone, "
                      "measured on calibration text",
        "calibration": {"chunks": len(calibration), "tokens": calibration.numel(),
                        "scored_positions": len(calibration) * len(range(calibration.shape[1])[scored_positions(request.head_every)])},
        "held_out": {"chunks": len(held_out), "tokens": held_out.numel()},
        "candidates": [c.to_dict() for c in candidates],
        "steps": [_step_dict(step, measured[step.groups]) for step, _ in steps],
        "plan": plan.to_dict(),
        "predicted_kl": _short(final.predicted_kl),
        "measured": _metrics(measured[final.groups]),
    }
    seconds = {"score": round(scored - started, 1), "verify": round(time.perf_counter() - scored, 1)}
    return SearchResult(plan, report, seconds)


def _metrics(result: dict) -> dict:
    return {key: _short(result[key]) for key in ("kl", "ppl", "top1", "original_ppl")}


def _step_dict(step: Choice, result: dict) -> dict:
    return {"groups": [list(g) for g in step.groups if len(g) > 1], "bypass": step.plan_bypass,
            "depth": len(step.groups), "predicted_kl": _short(step.predicted_kl), "measured": _metrics(result)}
