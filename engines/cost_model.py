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
ONNX_CPU = "onnxruntime-cpu"  # the engine of the default target


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

    @property
    def engine(self) -> str:
        """What ran the measurement: onnxruntime-cpu, ranks, cuda (files from before this field: from the target)."""
        return str(self.details.get("engine") or (ONNX_CPU if self.target.startswith(ONNX_CPU) else self.target))

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


def cost_model_from_medians(median: dict[str, float], singles: int, target: str, details: dict[str, Any],
                            layouts: tuple[str, ...] | None = None) -> CostModel:
    """Base, per-layer and per-group costs from the cut models' median decode steps (names as in cut_plans).

    `layouts`: file every group cost under each of these layouts (targets without an export layout: ranks, the
    PyTorch CUDA schedule), so the search finds them whatever --layout it is given.
    """
    layer = max((median["n"] - median["1"]) / (singles - 1), 1e-9)
    base = max(median["1"] - layer, 0.0)
    groups: dict[str, dict[int, float]] = {}
    for name, value in median.items():
        if name.startswith("g"):
            size, layout = name[1:].split(".", 1)
            for filed in layouts or (layout,):
                groups.setdefault(filed, {})[int(size)] = max(value - base, 0.0)
    details = {**details, "singles": singles, "median_step_s": {k: round(v, 6) for k, v in median.items()}}
    return CostModel(target, base, layer, groups, details)


def medians(times: dict[str, Any]) -> dict[str, float]:
    import numpy as np

    return {name: float(np.median(seconds)) for name, seconds in times.items()}


def onnx_decode_calls(original: Any, plans: dict[str, tuple[Plan, str]], settings: CostSettings, workdir: Path,
                      progress: bool = True) -> dict[str, Any]:
    """Each plan of `original` (an all-single CqilModel) exported into `workdir/name` in its layout, and its
    ONNX Runtime decode step (batch 1 over `settings.past` tokens) bound, ready to time."""
    import torch
    from cqil.engines.onnxruntime import OrtRunner
    from cqil.export.writer import export_model
    from cqil.model.cqil import CqilModel
    from cqil.model.steps import timing_calls

    ids = torch.randint(0, 100, (1, settings.past + 1), generator=torch.Generator().manual_seed(0))
    calls = {}
    for name, (plan, layout) in plans.items():
        folder = Path(workdir) / name.replace("@", "-")
        export_model(CqilModel(original.hf, plan), folder, layout, progress=progress)
        calls[name] = timing_calls(OrtRunner(folder, None, settings.threads, spin=False), ids, settings.past)[1]
    return calls


def measure_cost_model(original: Any, target: str, settings: CostSettings, workdir: Path,
                       progress: bool = True) -> CostModel:
    """Export the cut models of `original` (an all-single CqilModel) into `workdir`, time their decode steps
    with ONNX Runtime interleaved, and derive base, per-layer and per-group costs (medians)."""
    from cqil.engines.latency import interleaved_times

    calls = onnx_decode_calls(original, cut_plans(original.plan.num_layers, settings, dict(original.plan.model)),
                              settings, workdir, progress)
    times = interleaved_times(calls, settings.repeats, settings.warmup, progress="cost model" if progress else None)
    details = {"engine": ONNX_CPU, "past": settings.past, "repeats": settings.repeats, "threads": settings.threads}
    return cost_model_from_medians(medians(times), settings.singles, target, details)


def measure_plan_ratios(original: Any, plans: dict[str, Plan], layout: str, settings: CostSettings, workdir: Path,
                        progress: bool = True) -> dict[str, dict[str, float]]:
    """Each plan exported and its ONNX Runtime decode step timed, interleaved with the original's in the same
    rounds: {name: {"measured_step_s", "measured_ratio"}} (ratio of medians to the original's)."""
    from cqil.engines.latency import interleaved_times
    from cqil.model.plan import identity_plan

    everything = {"original": (identity_plan(original.plan.num_layers, dict(original.plan.model)), "branches"),
                  **{name: (plan, layout) for name, plan in plans.items()}}
    calls = onnx_decode_calls(original, everything, settings, workdir, progress)
    median = medians(interleaved_times(calls, settings.repeats, settings.warmup,
                                       progress="plan latency" if progress else None))
    return {name: {"measured_step_s": round(median[name], 6),
                   "measured_ratio": round(median[name] / median["original"], 6)}
            for name in plans}


def measure_device_cost_model(original: Any, settings: CostSettings, device: str = "cuda",
                              progress: bool = True) -> CostModel:
    """The cost model of a CUDA device: each cut model in PyTorch, every branch of a group on its own CUDA stream,
    its batch-1 decode step captured in a CUDA graph (engines/cuda_streams.DecodeStep), timed interleaved with a
    synchronize before each clock read. Off CUDA (`device="cpu"`, the tests) the same code runs eagerly, one
    branch after another. The group costs are filed under every layout of `settings` (PyTorch has none)."""
    import torch
    from cqil.engines.cuda_streams import DecodeStep, StreamSchedule
    from cqil.engines.latency import interleaved_times
    from cqil.model.cqil import CqilModel

    on_cuda = torch.device(device).type == "cuda"
    if on_cuda and not torch.cuda.is_available():
        raise CqilError("--cost-device cuda needs a CUDA GPU and none is visible here: leave --cost-device out "
                        "(ONNX Runtime CPU) or use --ranks P")
    hf = original.hf.to(device)
    calls = {}
    for name, (plan, _) in cut_plans(original.plan.num_layers, settings, dict(original.plan.model)).items():
        model = CqilModel(hf, plan, StreamSchedule()) if on_cuda else CqilModel(hf, plan)
        calls[name] = DecodeStep(model, settings.past, device, torch.float32, use_graph=on_cuda)
    times = interleaved_times(calls, settings.repeats, settings.warmup, torch.cuda.synchronize if on_cuda else None,
                              progress="cost model" if progress else None)
    name = torch.cuda.get_device_name(device) if on_cuda else "cpu"
    target = f"cuda ({name}, a stream per branch, CUDA graph)" if on_cuda else "torch-cpu (eager)"
    details = {"engine": "cuda" if on_cuda else "torch-cpu", "past": settings.past, "repeats": settings.repeats,
               "threads": settings.threads}
    return cost_model_from_medians(medians(times), settings.singles, target, details, settings.layouts)


def rank_cost_calls(ctx: Any, path: Path, settings: CostSettings) -> dict[str, Any]:
    """This rank's share of each cut model of the checkpoint at `path`, its decode step bound: what
    measure_rank_cost_model times. P ranks run plans whose largest group has P layers, so the groups measured
    are those of exactly `ctx.world` layers (only its own layer's weights loaded); the cuts of single layers
    run whole on every rank, as the per-rank schedule replicates single layers."""
    import dataclasses

    import torch
    from cqil.engines.distributed.per_rank import Placement, load_rank_model, rank_model
    from cqil.model.cqil import CqilModel
    from cqil.model.steps import timing_calls
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    if ctx.world > min(settings.max_group_size, config.num_hidden_layers):
        raise CqilError(f"a cost model on {ctx.world} ranks measures groups of {ctx.world} layers: raise "
                        f"--cost-max-group-size to {ctx.world} (the model has {config.num_hidden_layers} layers)")
    one_group = dataclasses.replace(settings, max_group_size=ctx.world, layouts=("branches",))
    cuts = cut_plans(config.num_hidden_layers, one_group, {})
    ids = torch.randint(0, 100, (1, settings.past + 1), generator=torch.Generator().manual_seed(0)).to(ctx.device)
    whole = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().to(ctx.device)
    calls = {}
    for name, (plan, _) in cuts.items():
        if plan.max_group_size == 1:
            model = CqilModel(whole, plan)
        elif plan.max_group_size == ctx.world:
            placement = Placement(plan, ctx.rank, ctx.world)
            model = rank_model(load_rank_model(path, placement, torch.float32).to(ctx.device), placement)
        else:
            continue
        calls[name] = timing_calls(model, ids, settings.past)[1]
    return calls


def measure_rank_cost_model(ctx: Any, calls: dict[str, Any], settings: CostSettings,
                            progress: bool = False) -> CostModel | None:
    """The cost model of CQIL on `ctx.world` torch.distributed ranks (rank r runs the r-th layer of each group):
    the cut models' decode steps (`rank_cost_calls`) timed interleaved, each call between two barriers, so its
    time is the slowest rank's. Rank 0 returns the cost model, filed under every layout of `settings` (the
    ranks run one schedule whatever the export layout); the other ranks None."""
    import torch
    from cqil.engines.distributed.bench import rank_hooks
    from cqil.engines.latency import interleaved_times

    threads = settings.threads or 1
    before, after = rank_hooks({name: threads for name in calls})
    synchronize = torch.cuda.synchronize if ctx.device.type == "cuda" else None
    times = interleaved_times(calls, settings.repeats, settings.warmup, synchronize, before=before, after=after,
                              progress="cost model" if progress and ctx.rank == 0 else None)
    if ctx.rank != 0:
        return None
    target = f"torch.distributed ({ctx.world} ranks, {ctx.backend}, {threads} threads each)"
    details = {"engine": "ranks", "ranks": ctx.world, "backend": ctx.backend, "past": settings.past,
               "repeats": settings.repeats, "threads": threads}
    return cost_model_from_medians(medians(times), settings.singles, target, details, settings.layouts)
