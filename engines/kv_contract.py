"""The exported model's I/O contract (DESIGN.md section 4), as the engines read it from an ONNX file.

Inputs: `input_ids` [batch, seq], `attention_mask` [batch, past+seq], `position_ids` [batch, seq],
`past_key_values.{i}.key|value` [batch, kv_heads, past, head_dim]; outputs `logits` and
`present.{i}.key|value`, defined once in export/contract.py. The plan rides in the graph's
`metadata_props` under `cqil.plan` (the JSON of `Plan.to_dict()`).

Only the graph's declarations are read (`load_external_data=False`), so this is quick on a 7B export.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from export.contract import PLAN_KEY, SOURCE_KEY, input_names, past_pair
from pipeline.model.errors import CqilError
from pipeline.model.plan import Plan, plan_from_dict

PLAN_METADATA_KEY = PLAN_KEY


@dataclass(frozen=True)
class ContractSpec:
    """What the engines need to know about an exported decoder."""

    num_layers: int
    kv_heads: int
    head_dim: int
    kv_dtype: str  # ONNX element type name of the cache, e.g. "FLOAT" or "FLOAT16"
    plan: Plan | None
    inputs: tuple[str, ...]  # the contract inputs the graph declares, in contract order
    metadata: dict[str, str] = field(default_factory=dict)  # the model's metadata_props (cqil.* keys)

    def source_model(self) -> dict:
        """The `cqil.source_model` record (name, path) of the exported model; {} when absent."""
        try:
            record = json.loads(self.metadata.get(SOURCE_KEY, "{}"))
        except json.JSONDecodeError:
            return {}
        return record if isinstance(record, dict) else {}


def find_onnx(path: Path) -> Path:
    """`--onnx` may name the file or its directory (holding exactly one .onnx, or model.onnx)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise CqilError(f"--onnx '{path}' does not exist: pass the directory written by `cqil export`")
    if (path / "model.onnx").is_file():
        return path / "model.onnx"
    found = sorted(path.glob("*.onnx"))
    if len(found) != 1:
        what = "no .onnx file" if not found else f"{len(found)} .onnx files"
        raise CqilError(f"--onnx directory '{path}' holds {what}: pass the .onnx file itself")
    return found[0]


def read_contract(onnx_path: Path) -> ContractSpec:
    """Check the graph's inputs against the contract and read the cache geometry and the plan."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ... for a damaged file
        raise CqilError(f"'{onnx_path}' is not a readable ONNX model ({exc.__class__.__name__}): "
                        "export it again with `cqil export`") from exc
    inputs = {value.name: value for value in model.graph.input}
    for name in ("input_ids", "attention_mask"):
        if name not in inputs:
            raise CqilError(f"'{onnx_path}' has no '{name}' input: it does not follow the cqil "
                            "ONNX contract (export it with `cqil export`)")
    num_layers = 0
    while past_pair(num_layers)[0] in inputs:
        num_layers += 1
    if num_layers == 0:
        raise CqilError(f"'{onnx_path}' has no past_key_values.0.key input: export it with the KV cache")
    unknown = sorted(set(inputs) - set(input_names(num_layers)))
    if unknown:
        raise CqilError(f"'{onnx_path}' has inputs outside the cqil contract: {', '.join(unknown)}")
    shape = _dims(inputs["past_key_values.0.key"])
    if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
        raise CqilError(f"'{onnx_path}': past_key_values.0.key must be [batch, kv_heads, past, head_dim] "
                        f"with fixed kv_heads and head_dim, found {shape}")
    for layer in range(num_layers):
        for name in past_pair(layer):
            if name not in inputs or _dims(inputs[name]) != shape:
                raise CqilError(f"'{onnx_path}': input {name} is missing or differs in shape from "
                                f"past_key_values.0.key {shape}")
    elem = inputs["past_key_values.0.key"].type.tensor_type.elem_type
    plan = _plan_from_metadata(model, num_layers, onnx_path)
    declared = tuple(name for name in input_names(num_layers) if name in inputs)
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    return ContractSpec(num_layers, shape[1], shape[3], onnx.TensorProto.DataType.Name(elem), plan, declared,
                        metadata)


def _dims(value) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value.type.tensor_type.shape.dim]


def _plan_from_metadata(model, num_layers: int, onnx_path: Path) -> Plan | None:
    entries = {prop.key: prop.value for prop in model.metadata_props}
    if PLAN_METADATA_KEY not in entries:
        return None
    try:
        data = json.loads(entries[PLAN_METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise CqilError(f"'{onnx_path}': metadata '{PLAN_METADATA_KEY}' is not JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CqilError(f"'{onnx_path}': metadata '{PLAN_METADATA_KEY}' must hold a plan object")
    return plan_from_dict(data, num_layers)
