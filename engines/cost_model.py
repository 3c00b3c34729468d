"""A latency cost model of one target: what a decode step costs per layer, per CQIL group and outside the layers.

The same plan saves different time on different targets: on ONNX Runtime CPU a group's branches run one
after another (a pair saves little), on several ranks or GPU streams they run side by side. `cqil bench
--cost-model` measures the numbers on the target it runs on, and the plan search (pipeline.autoplan)
predicts a plan's latency from them:

    step(plan) = base + sum over groups (layer if the group is one layer, else group[layout][p])

Dropped layers cost nothing. `predicted_ratio` divides by the original (every layer alone).

Measuring uses plans that drop layers: the model cut to 1 and to n single layers gives base and the cost
of one layer; cut to one group of p layers it gives that group's cost. Each cut model is exported and
timed by ONNX Runtime, decode step, interleaved in the same rounds.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cqil.model.errors import CqilError
from cqil.model.plan import Plan

COST_FORMAT = "cqil-cost-model/1"


@dataclass(frozen=True)
class CostModel:
    """Seconds per decode step: `base` (embeddings, norm, head), `layer`, and `groups[layout][p]`."""

    target: str
    base: float
    layer: float
    groups: dict[str, dict[int, float]]
    details: dict[str, Any]  # how it was measured (shape, repeats, load); not used for prediction

    def group_cost(self, size: int, layout: str = "branches") -> float | None:
        """A group of `size` layers in `layout`; None when not measured (the search then never uses it)."""
        if size == 1:
            return self.layer
        return self.groups.get(layout, {}).get(size)

    def step(self, plan: Plan, layout: str = "branches") -> float:
        total = self.base
        for group in plan.groups:
            cost = self.group_cost(len(group), layout)
            if cost is None:
                raise CqilError(f"the cost model of '{self.target}' has no group of {len(group)} layers in "
                                f"layout '{layout}': measure it with `cqil bench --cost-model --max-group-size`")
            total += cost
        return total

    def original(self, num_layers: int) -> float:
        return self.base + num_layers * self.layer

    def predicted_ratio(self, plan: Plan, layout: str = "branches") -> float:
        """Predicted decode-step latency of `plan` over the original's, under this cost model."""
        return self.step(plan, layout) / self.original(plan.num_layers)

    def to_dict(self) -> dict[str, Any]:
        return {"format": COST_FORMAT, "target": self.target, "base_s": self.base, "layer_s": self.layer,
                "group_s": {layout: {str(p): s for p, s in sizes.items()} for layout, sizes in self.groups.items()},
                **({"measured": self.details} if self.details else {})}


def _seconds(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise CqilError(f"{where} must be a non-negative number of seconds, not {value!r}")
    return float(value)


def cost_model_from_dict(data: Any, source: str = "cost model") -> CostModel:
    """A cost model read back, every field checked (one-line errors naming the field)."""
    if not isinstance(data, dict):
        raise CqilError(f"{source} must hold a JSON object (made by `cqil bench --cost-model`)")
    if data.get("format") != COST_FORMAT:
        raise CqilError(f"{source}: format {data.get('format')!r} is not {COST_FORMAT!r}: "
                        "measure it again with `cqil bench --cost-model`")
    for key in ("target", "base_s", "layer_s", "group_s"):
        if key not in data:
            raise CqilError(f"{source} lacks '{key}': measure it again with `cqil bench --cost-model`")
    if not isinstance(data["target"], str) or not data["target"]:
        raise CqilError(f"{source}: 'target' must name the target it was measured on")
    base = _seconds(data["base_s"], f"{source}: 'base_s'")
    layer = _seconds(data["layer_s"], f"{source}: 'layer_s'")
    if layer <= 0:
        raise CqilError(f"{source}: 'layer_s' must be positive: a layer that costs nothing cannot be saved")
    if not isinstance(data["group_s"], dict):
        raise CqilError(f"{source}: 'group_s' must map a layout to {{group size: seconds}}")
    groups: dict[str, dict[int, float]] = {}
    for layout, sizes in data["group_s"].items():
        if not isinstance(sizes, dict):
            raise CqilError(f"{source}: 'group_s.{layout}' must map a group size to seconds")
        groups[layout] = {}
        for size, seconds in sizes.items():
            if not (isinstance(size, str) and size.isdigit() and int(size) >= 2):
                raise CqilError(f"{source}: group size {size!r} in 'group_s.{layout}' must be an integer >= 2")
            groups[layout][int(size)] = _seconds(seconds, f"{source}: 'group_s.{layout}.{size}'")
    details = data.get("measured") if isinstance(data.get("measured"), dict) else {}
    return CostModel(data["target"], base, layer, groups, details)


def load_cost_model(path: Path) -> CostModel:
    from cqil.model.fsutil import read_json

    return cost_model_from_dict(read_json(path, "cost model", "measure one with `cqil bench --cost-model`"),
                                f"cost model '{path}'")


def save_cost_model(model: CostModel, path: Path) -> None:
    from cqil.model.fsutil import atomic_write_text

    atomic_write_text(Path(path), json.dumps(model.to_dict(), indent=2) + "\n")


@dataclass(frozen=True)
class CostSettings:
    """What `cqil bench --cost-model` times: a decode step of batch 1 over `past` tokens."""

    past: int = 128
    repeats: int = 30
    warmup: int = 3
    singles: int = 4  # the cut with n single layers (n >= 2)
    max_group_size: int = 4
    layouts: tuple[str, ...] = ("branches",)
    threads: int | None = None


def cut_plans(num_layers: int, settings: CostSettings, record: dict) -> dict[str, tuple[Plan, str]]:
    """The cut models to time, by name: `1` and `n` single layers, and `g{p}.{layout}`: one group of p."""
    from cqil.model.plan import from_parallel_groups

    largest = min(settings.max_group_size, num_layers)
    if settings.singles < 2 or settings.singles > num_layers or largest < 2:
        raise CqilError(f"a cost model needs 2..{num_layers} single layers and groups of 2..{num_layers} "
                        f"(got {settings.singles} and {settings.max_group_size})")

    def keep(parallel: list[list[int]], kept: int) -> Plan:
        return from_parallel_groups(parallel, num_layers, min(1, kept - 1) if parallel else 0, record,
                                    tuple(range(kept, num_layers)))

    plans = {"1": (keep([], 1), "branches"), "n": (keep([], settings.singles), "branches")}
    for layout in settings.layouts:
        for size in range(2, largest + 1):
            plans[f"g{size}.{layout}"] = (keep([list(range(size))], size), layout)
    return plans


def measure_cost_model(original: Any, target: str, settings: CostSettings, workdir: Path,
                       progress: bool = True) -> CostModel:
    """Export the cut models of `original` (an all-single CqilModel) into `workdir`, time their decode steps
    with ONNX Runtime interleaved, and derive base, per-layer and per-group costs (medians)."""
    import numpy as np
    import torch
    from cqil.engines.latency import interleaved_times
    from cqil.engines.onnxruntime import OrtRunner
    from cqil.export.writer import export_model
    from cqil.model.cqil import CqilModel
    from cqil.model.steps import timing_calls

    plans = cut_plans(original.plan.num_layers, settings, dict(original.plan.model))
    runners = {}
    for name, (plan, layout) in plans.items():
        folder = Path(workdir) / name
        export_model(CqilModel(original.hf, plan), folder, layout, progress=progress)
        runners[name] = OrtRunner(folder, None, settings.threads, spin=False)
    ids = torch.randint(0, 100, (1, settings.past + 1), generator=torch.Generator().manual_seed(0))
    calls = {name: timing_calls(runner, ids, settings.past)[1] for name, runner in runners.items()}
    times = interleaved_times(calls, settings.repeats, settings.warmup, progress="cost model" if progress else None)
    median = {name: float(np.median(seconds)) for name, seconds in times.items()}
    layer = max((median["n"] - median["1"]) / (settings.singles - 1), 1e-9)
    base = max(median["1"] - layer, 0.0)
    groups: dict[str, dict[int, float]] = {}
    for name, value in median.items():
        if name.startswith("g"):
            size, layout = name[1:].split(".", 1)
            groups.setdefault(layout, {})[int(size)] = max(value - base, 0.0)
    details = {"past": settings.past, "repeats": settings.repeats, "singles": settings.singles,
               "threads": settings.threads, "median_step_s": {k: round(v, 6) for k, v in median.items()}}
    return CostModel(target, base, layer, groups, details)
