"""Structure check of an exported file: every group is p separate branches reading one input.

The point of the branch layout is that a runtime may run a group's layers concurrently, which only
holds while the branches share nothing but the group input. An optimizer (common-subexpression
elimination, for one) can merge identical computations of different branches, such as the RMSNorm
statistics of the same x, and quietly serialize them. The check reads the cqil.* node metadata that
`export.naming` writes and accepts only these edges between the nodes of a group:
- within one branch;
- from branch j' attention into branch j's `bypass` with 1 <= j - j' <= d (the bypass edges);
- from any branch into the group's `combine` (the final sum), or out of the graph as presents.
Each branch's attention norm must read the group input, the same tensor for all p branches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cqil.export import contract
from cqil.export.naming import BRANCH, GROUP, LAYER, ROLE


@dataclass
class StructureReport:
    ok: bool
    groups: int = 0
    branches: int = 0
    problems: list[str] = field(default_factory=list)

    def describe(self) -> str:
        if self.ok:
            return f"branch structure ok: {self.groups} groups, {self.branches} branches"
        more = f" (+{len(self.problems) - 5} more)" if len(self.problems) > 5 else ""
        return "branch structure broken: " + "; ".join(self.problems[:5]) + more


@dataclass(frozen=True)
class _Label:
    group: int | None
    branch: int | None
    layer: str | None
    role: str | None


def _label(node) -> _Label:
    meta = {p.key: p.value for p in node.metadata_props}
    group = meta.get(GROUP)
    branch = meta.get(BRANCH)
    return _Label(int(group) if group is not None else None, int(branch) if branch is not None else None,
                  meta.get(LAYER), meta.get(ROLE))


def check_branch_structure(source) -> StructureReport:
    """Check an ONNX file (path) or ModelProto exported in the branch layout; never raises on bad graphs."""
    import onnx

    model = onnx.load(str(source), load_external_data=False) if isinstance(source, (str, Path)) else source
    meta = {p.key: p.value for p in model.metadata_props}
    if contract.PLAN_KEY not in meta:
        return StructureReport(False, problems=[f"no '{contract.PLAN_KEY}' metadata: not a cqil export"])
    if meta.get(contract.LAYOUT_KEY, "branches") != "branches":
        return StructureReport(False, problems=[f"layout is '{meta[contract.LAYOUT_KEY]}': its groups are "
                                                "packed into wide operations, not branches"])
    plan = json.loads(meta[contract.PLAN_KEY])
    groups, bypass = plan["groups"], plan["bypass"]
    graph = model.graph
    labels = [_label(node) for node in graph.node]
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    graph_inputs = {value.name for value in graph.input}
    problems: list[str] = []

    for i, node in enumerate(graph.node):
        consumer = labels[i]
        for name in node.input:
            if name not in producer:
                continue  # graph input or initializer
            source_label = labels[producer[name]]
            if source_label.branch is None:
                continue  # shared tensors (mask, rope, shapes) and group-level nodes feed anyone
            problem = _edge_problem(source_label, consumer, bypass)
            if problem:
                problems.append(f"{node.name} reads {graph.node[producer[name]].name}: {problem}")

    branches = 0
    for index, layers in enumerate(groups):
        inputs_per_branch = []
        for position, layer in enumerate(layers):
            norm_inputs = set()
            found = False
            for i, node in enumerate(graph.node):
                label = labels[i]
                if label.group != index or label.branch != position:
                    continue
                found = True
                if label.layer != str(layer):
                    problems.append(f"group {index} branch {position} is labelled layer {label.layer}, "
                                    f"the plan says {layer}")
                    break
                if label.role == "attn_norm":
                    norm_inputs |= {name for name in node.input if name in graph_inputs
                                    or name in producer and labels[producer[name]].group != index}
            if not found:
                problems.append(f"group {index}: no nodes for layer {layer} (branch {position})")
            inputs_per_branch.append(norm_inputs)
        branches += len(layers)
        if len(layers) > 1 and any(len(s) != 1 or s != inputs_per_branch[0] for s in inputs_per_branch):
            problems.append(f"group {index}: the attention norms of its {len(layers)} branches do not all read "
                            f"one group input ({[sorted(s) for s in inputs_per_branch]})")
    return StructureReport(not problems, len(groups), branches, problems)


def _edge_problem(source: _Label, consumer: _Label, bypass: int) -> str | None:
    """Why an edge out of a branch node is not allowed, or None."""
    if consumer.group != source.group:
        return f"group {consumer.group} reads the inside of group {source.group}"
    if consumer.branch is None:
        return None if consumer.role == "combine" else f"group-level {consumer.role} reads a branch"
    if consumer.branch == source.branch:
        return None
    distance = consumer.branch - source.branch
    if consumer.role == "bypass" and source.role == "attn" and 1 <= distance <= bypass:
        return None
    return (f"layer {consumer.layer} {consumer.role} reads layer {source.layer} {source.role} "
            f"(branches merged)")
