"""CQIL plans: an ordered partition of the kept decoder layers into groups, the dropped layers, and the
bypass distance.

A plan is made from explicit groups (`15-16,17-18`), a uniform S:E:P spec as in the paper, the
official CQIL config form (`cqil_layers` + `d`), or pruning (`dropped`: depth pruning's baseline,
DESIGN.md section 1). Layers that no group names and that are not dropped run alone. The plan records
the model it was made for and refuses a model it does not fit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from cqil.model.errors import CqilError

PLAN_FORMAT = "cqil-plan/2"  # /2 added `dropped`
READABLE_FORMATS = ("cqil-plan/1", PLAN_FORMAT)  # an unknown (newer) version could mean anything: refused
CONFIG_KEY = "cqil_plan"  # where a merged checkpoint's config.json carries its plan


@dataclass(frozen=True)
class Plan:
    groups: tuple[tuple[int, ...], ...]
    bypass: int = 0
    model: dict[str, Any] = field(default_factory=dict, compare=False)
    dropped: tuple[int, ...] = ()  # layers removed from the model (sorted); the groups cover the others
    latency: dict[str, Any] = field(default_factory=dict, compare=False)  # a cost model's prediction, if any

    def __post_init__(self) -> None:
        validate_layout(self.groups, self.dropped)
        largest = max(len(g) for g in self.groups)
        if not 0 <= self.bypass <= max(largest - 1, 0):
            raise CqilError(
                f"bypass distance {self.bypass} does not fit this plan: with groups of at most "
                f"{largest} layers use --bypass 0..{max(largest - 1, 0)}"
            )

    @property
    def layers(self) -> list[int]:
        """The kept layers in the order they run; their KV-cache entries are numbered 0.. in this order."""
        return [layer for group in self.groups for layer in group]

    @property
    def num_layers(self) -> int:
        """Layers of the model the plan was made for, dropped ones included."""
        return len(self.layers) + len(self.dropped)

    @property
    def num_kept(self) -> int:
        """Layers that run (and have a KV-cache entry)."""
        return len(self.layers)

    @property
    def depth(self) -> int:
        """Layers on the critical path: one per group."""
        return len(self.groups)

    @property
    def max_group_size(self) -> int:
        return max(len(g) for g in self.groups)

    @property
    def is_identity(self) -> bool:
        """Every layer alone and none dropped: the original model."""
        return self.max_group_size == 1 and not self.dropped

    def describe(self) -> str:
        parallel = [g for g in self.groups if len(g) > 1]
        spans = ",".join(f"{g[0]}-{g[-1]}" for g in parallel) or "none"
        dropped = f", dropped {','.join(map(str, self.dropped))}" if self.dropped else ""
        return f"depth {self.depth}/{self.num_layers}, bypass d={self.bypass}, parallel groups {spans}{dropped}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "groups": [list(g) for g in self.groups],
            "dropped": list(self.dropped),
            "bypass": self.bypass,
            "num_layers": self.num_layers,
            "depth": self.depth,
            "model": dict(self.model),
            **({"latency": dict(self.latency)} if self.latency else {}),
        }

    def save(self, path: Path) -> None:
        from cqil.model.fsutil import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    def check_fits(self, config: Any) -> None:
        """Refuse a model whose layer count or family differs from the one the plan was made for."""
        layers = config.num_hidden_layers
        if layers != self.num_layers:
            raise CqilError(
                f"the plan covers {self.num_layers} layers but the model has {layers}: "
                "make a plan for this model with `cqil plan --model ...`"
            )
        made_for = self.model.get("model_type")
        if made_for and made_for != config.model_type:
            raise CqilError(
                f"the plan was made for a '{made_for}' model, not '{config.model_type}': "
                "make a plan for this model with `cqil plan --model ...`"
            )
        hidden = self.model.get("hidden_size")
        if hidden and hidden != config.hidden_size:
            raise CqilError(
                f"the plan was made for a model of hidden size {hidden}, this one has "
                f"{config.hidden_size}: make a plan for this model with `cqil plan --model ...`"
            )


def _is_index(layer: Any) -> bool:
    return isinstance(layer, int) and not isinstance(layer, bool)


def validate_layout(groups: Any, dropped: Any) -> None:
    """Groups must be non-empty runs of the kept layers covering them once, in order; dropped layers
    are named once each and never all of them."""
    for layer in dropped:
        if not _is_index(layer):
            raise CqilError(f"dropped layer {layer!r} is not an integer")
    if sorted(set(dropped)) != list(dropped):
        twice = sorted({layer for layer in dropped if list(dropped).count(layer) > 1})
        if twice:
            raise CqilError(f"the plan drops layer {twice[0]} twice: name each dropped layer once")
        raise CqilError(f"dropped layers {list(dropped)} must be in increasing order")
    if not groups:
        if dropped:
            raise CqilError(f"the plan drops every layer ({len(dropped)} of {len(dropped)}): keep at least one")
        raise CqilError("a plan needs at least one group")
    num_layers = sum(len(g) for g in groups) + len(dropped)
    gone = set(dropped)
    expected = 0
    for group in groups:
        if not group:
            raise CqilError("a plan group is empty")
        for layer in group:
            if not _is_index(layer):
                raise CqilError(f"layer index {layer!r} is not an integer")
            if layer in gone:
                raise CqilError(f"layer {layer} is both dropped and in group {list(group)}: name it once")
            while expected in gone:
                expected += 1
            if layer != expected:
                raise CqilError(
                    f"plan groups must be consecutive layers covering 0..{num_layers - 1} exactly "
                    f"once, in order (dropped layers aside): expected layer {expected}, found {layer} "
                    f"in group {list(group)}"
                )
            expected += 1
    if dropped and dropped[-1] >= num_layers:
        raise CqilError(f"dropped layer {dropped[-1]} is outside 0..{num_layers - 1} of this plan's layers")


def model_record(config: Any) -> dict[str, Any]:
    """What a plan remembers of its model, to refuse another one later."""
    return {
        "model_type": config.model_type,
        "architecture": (getattr(config, "architectures", None) or ["?"])[0],
        "num_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        # the folder's name, not its path: a plan (and an ONNX that carries it) must not depend on where it lies
        "name": PurePath(getattr(config, "name_or_path", "") or "").name,
    }


def from_parallel_groups(parallel: list[list[int]], num_layers: int, bypass: int = 0,
                         model: dict | None = None, dropped: tuple[int, ...] = ()) -> Plan:
    """Complete a list of parallel groups with single layers everywhere else (dropped layers aside)."""
    for layer in dropped:
        if not _is_index(layer) or not 0 <= layer < num_layers:
            raise CqilError(f"dropped layer {layer!r} is outside 0..{num_layers - 1} of this model")
    claimed: dict[int, list[int]] = {layer: ["dropped"] for layer in dropped}
    for group in parallel:
        group = list(group)
        if not group:
            raise CqilError("a plan group is empty")
        if group != list(range(group[0], group[0] + len(group))):
            raise CqilError(f"group {group} is not a run of consecutive layers (e.g. 15-16)")
        for layer in group:
            if not 0 <= layer < num_layers:
                raise CqilError(
                    f"group {group} names layer {layer}, outside 0..{num_layers - 1} of this model"
                )
            if layer in claimed:
                raise CqilError(f"layer {layer} is in two groups: {claimed[layer]} and {group}")
            claimed[layer] = group
    starts = {group[0]: tuple(group) for group in map(list, parallel)}
    gone = set(dropped)
    groups: list[tuple[int, ...]] = []
    layer = 0
    while layer < num_layers:
        if layer in gone:
            layer += 1
            continue
        group = starts.get(layer, (layer,))
        groups.append(group)
        layer += len(group)
    return Plan(tuple(groups), bypass, model or {}, tuple(sorted(dropped)))


# How `cqil plan --prune K` may choose the dropped layers (pipeline/prune.py); here, torch-free, for the flag's check.
PRUNE_METHODS = ("block-influence", "greedy")


def pruned_plan(dropped: list[int], num_layers: int, model: dict | None = None) -> Plan:
    """Depth pruning: the layers `dropped` removed, every other layer alone."""
    return from_parallel_groups([], num_layers, 0, model, tuple(sorted(dropped)))


def parse_groups_spec(spec: str, num_layers: int, bypass: int = 0, model: dict | None = None) -> Plan:
    """`--groups 15-16,17-18` (single numbers allowed) -> plan; other layers stay single."""
    parallel = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
            else:
                lo = hi = int(part)
        except ValueError:
            raise CqilError(f"--groups part '{part}' is not 'A-B' or 'A' with integer layers") from None
        if hi < lo:
            raise CqilError(f"--groups part '{part}' runs backwards: write it as {hi}-{lo}")
        parallel.append(list(range(lo, hi + 1)))
    if not parallel:
        raise CqilError("--groups is empty: write e.g. --groups 15-16,17-18")
    return from_parallel_groups(parallel, num_layers, bypass, model)


def uniform_plan(start: int, end: int, size: int, num_layers: int, bypass: int = 0,
                 model: dict | None = None) -> Plan:
    """The paper's plans: groups of `size` consecutive layers inside [start, end), last may be smaller."""
    if not 0 <= start < end <= num_layers:
        raise CqilError(
            f"uniform plan {start}:{end}:{size} needs 0 <= S < E <= {num_layers} (this model's layers)"
        )
    if size < 1:
        raise CqilError(f"uniform plan group size {size} must be at least 1")
    if size > end - start:
        raise CqilError(f"uniform plan group size {size} is larger than the span {start}..{end - 1}")
    parallel = [list(range(s, min(s + size, end))) for s in range(start, end, size)]
    return from_parallel_groups(parallel, num_layers, bypass, model)


def parse_uniform_spec(spec: str, num_layers: int, bypass: int = 0, model: dict | None = None) -> Plan:
    """`--uniform S:E:P`."""
    try:
        start, end, size = (int(x) for x in spec.split(":"))
    except ValueError:
        raise CqilError(f"--uniform '{spec}' is not S:E:P with integers, e.g. 15:30:2") from None
    return uniform_plan(start, end, size, num_layers, bypass, model)


def identity_plan(num_layers: int, model: dict | None = None) -> Plan:
    """Every layer alone: the original model."""
    return Plan(tuple((i,) for i in range(num_layers)), 0, model or {})


def plan_from_dict(data: dict[str, Any], num_layers: int | None = None) -> Plan:
    """Our plan.json (any readable format version), or the official CQIL form (`cqil_layers` + `d`)."""
    model = data.get("model") or {}
    version = data.get("format")
    if version is not None and version not in READABLE_FORMATS:
        raise CqilError(f"plan format {version!r} is not one this cqil reads ({', '.join(READABLE_FORMATS)}): "
                        "upgrade cqil or remake the plan with `cqil plan`")
    dropped = data.get("dropped", [])
    if not isinstance(dropped, list) or not all(_is_index(layer) for layer in dropped):
        raise CqilError("plan 'dropped' must be a list of layer indices")
    if "groups" in data:
        groups = _layer_lists(data["groups"], "groups")
        owner: dict[Any, list] = {}
        for group in groups:
            for layer in group:
                if isinstance(layer, int) and layer in owner:
                    raise CqilError(f"layer {layer} is in two groups of the plan, {owner[layer]} and {group}: "
                                    "groups must not overlap")
                owner[layer] = group
        count = sum(len(g) for g in groups) + len(dropped)
        if num_layers is not None and count != num_layers:
            raise CqilError(
                f"the plan covers {count} layers but the model has {num_layers}: "
                "make a plan for this model with `cqil plan --model ...`"
            )
        latency = data.get("latency") if isinstance(data.get("latency"), dict) else {}
        return Plan(tuple(tuple(g) for g in groups), _bypass(data.get("bypass", 0)), model, tuple(sorted(dropped)),
                    latency)
    if "cqil_layers" in data:
        layers = num_layers or data.get("num_hidden_layers") or model.get("num_layers")
        if not layers:
            raise CqilError("an official CQIL config ('cqil_layers') needs the model's layer count: pass --model")
        return from_parallel_groups(_layer_lists(data["cqil_layers"], "cqil_layers"), int(layers),
                                    _bypass(data.get("d", 0)), model, tuple(sorted(dropped)))
    raise CqilError("not a plan: expected 'groups' (cqil plan.json) or 'cqil_layers' (official CQIL config)")


def _layer_lists(value: Any, field: str) -> list[list[int]]:
    """A plan file's groups as read from JSON: a list of lists of integers, or one line saying it is not."""
    def is_layer(item: Any) -> bool:
        return isinstance(item, int) and not isinstance(item, bool)

    if not isinstance(value, list) or not all(isinstance(g, list) and all(map(is_layer, g)) for g in value):
        raise CqilError(f"plan '{field}' must be a list of lists of layer indices (integers), got {value!r:.80}")
    return value


def _bypass(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CqilError(f"bypass distance {value!r} must be a non-negative integer")
    return value


def load_plan(path: Path, num_layers: int | None = None) -> Plan:
    from cqil.model.fsutil import read_json

    data = read_json(path, "plan file", "make one with `cqil plan`")
    if not isinstance(data, dict):
        raise CqilError(f"plan file '{path}' must hold a JSON object")
    return plan_from_dict(data, num_layers)


def plan_from_config(config: Any) -> Plan | None:
    """The plan a merged CQIL checkpoint carries in its config, if any."""
    data = getattr(config, CONFIG_KEY, None)
    return plan_from_dict(data, config.num_hidden_layers) if data else None
