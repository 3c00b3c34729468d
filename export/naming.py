"""Names and metadata that say which group, branch, layer and role every ONNX node belongs to.

The layout schedule (export/layouts.py) runs each piece of a group inside a scope module named
`g{group}[.l{layer}].{role}`.
The dynamo exporter writes the module stack of every node into its metadata
(`pkg.torch.onnx.name_scopes`); `label_nodes` reads it back after export and gives each node a path
name (`/g7/l16/attn/q_proj/MatMul`) and the metadata `cqil.group`, `cqil.branch`, `cqil.layer` and
`cqil.role`, which `export.check` relies on. Roles inside the reference layer come from its HF
modules: `input_layernorm` is the attention norm, `post_attention_layernorm` the FFN norm.
"""

from __future__ import annotations

import ast
import re

from cqil.model.plan import Plan

SCOPES_KEY = "pkg.torch.onnx.name_scopes"
# Stack traces carry absolute source paths, the FX text is a bulky repeat of the node: dropped, so
# that the file depends on the model and the plan, not on where the tool is installed.
DROPPED_KEYS = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node")
GROUP, BRANCH, LAYER, ROLE = "cqil.group", "cqil.branch", "cqil.layer", "cqil.role"

OWN_SCOPE = re.compile(r"(?:^|\.)(g\d+(?:\..*)?)$")
HF_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")
HF_ROLE = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
HF_WRAPPERS = ("self_attn", "mlp")  # containers whose children name the part (q_proj, gate_proj, ...)
HF_OUTSIDE = {"embed_tokens": "embed", "rotary_emb": "rope", "norm": "final_norm", "lm_head": "lm_head"}
SHARED = "shared"  # mask, positions and shape arithmetic that every group reads


def group_scope(index: int) -> str:
    return f"g{index}"


def layer_scope(layer: int) -> str:
    return f"l{layer}"


def _own_scope(scopes: list[str]) -> list[str] | None:
    """The deepest scope of the layout's schedule (`model.schedule.g1.l2.attn` -> [g1, l2, attn]), if any."""
    own = [match.group(1) for s in scopes if (match := OWN_SCOPE.search(s))]
    return own[-1].split(".") if own else None


def _hf_part(scopes: list[str]) -> tuple[str | None, list[str]]:
    """(role override, name parts) from the deepest HF module inside a decoder layer."""
    for scope in reversed(scopes):
        match = HF_LAYER.search(scope)
        if match:
            parts = match.group(2).split(".")
            role = HF_ROLE.get(parts[0])
            rest = parts[1:] if role or parts[0] in HF_WRAPPERS else parts
            return role, rest
    return None, []


def describe_node(scopes: list[str], plan: Plan) -> tuple[str, dict[str, str]]:
    """(path prefix, cqil.* metadata) of a node from its module stack (fx node name excluded)."""
    own = _own_scope(scopes)
    if own is None:
        for scope in reversed(scopes):
            last = scope.rsplit(".", 1)[-1]
            if last in HF_OUTSIDE:
                return f"/{HF_OUTSIDE[last]}", {ROLE: HF_OUTSIDE[last]}
        return f"/{SHARED}", {ROLE: SHARED}
    group = int(own[0][1:])
    layers = plan.groups[group]
    rest = own[1:]
    meta = {GROUP: str(group)}
    if rest and re.fullmatch(r"l\d+", rest[0]):
        layer = int(rest[0][1:])
        meta[LAYER] = str(layer)
        meta[BRANCH] = str(layers.index(layer))
        rest = rest[1:]
    else:
        meta[LAYER] = ",".join(map(str, layers))
    role = rest[0] if rest else "group"
    hf_role, hf_parts = _hf_part(scopes)
    role = hf_role or role
    meta[ROLE] = role
    path = [own[0], *([f"l{meta[LAYER]}"] if BRANCH in meta else []), role, *rest[1:], *hf_parts]
    return "/" + "/".join(path), meta


def label_nodes(graph, plan: Plan) -> None:
    """Rename every node of an onnx_ir graph by its scope and attach the cqil.* metadata (in place)."""
    used: dict[str, int] = {}
    for node in graph:
        props = node.metadata_props
        scopes = ast.literal_eval(props[SCOPES_KEY])[:-1] if SCOPES_KEY in props else []
        prefix, meta = describe_node(scopes, plan)
        base = f"{prefix}/{node.op_type}"
        count = used.get(base, 0)
        used[base] = count + 1
        node.name = base if count == 0 else f"{base}_{count}"
        for key in DROPPED_KEYS:
            props.pop(key, None)
        props.update(meta)
