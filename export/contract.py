"""The ONNX I/O contract of DESIGN.md section 4, for writing and for reading: names, dynamic shapes,
metadata keys, example inputs, the traced call, and what a runtime reads back from a file.

The names are the ones Hugging Face Optimum and ONNX Runtime GenAI use for decoders with past, so a
runtime written for those can feed our files. One graph serves prefill (past = 0), decode (seq = 1)
and left-padded batches: batch, seq and past are dynamic; the attention mask spans past + seq.
The flat cache of `CqilModel` (k0, v0, k1, v1, ...) is, in that order, `past_key_values.{i}.key|value`
on the way in and `present.{i}.key|value` on the way out. The plan rides in `metadata_props`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from cqil.model.cqil import CqilModel
from cqil.model.errors import CqilError
from cqil.model.kv import make_cache
from cqil.model.plan import Plan, plan_from_dict
from torch import nn

BATCH, SEQ, PAST, TOTAL = "batch", "seq", "past", "total"
# torch.export specializes a dimension whose example size is 0 or 1: keep every example size >= 2.
EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST = 2, 3, 4


TOKEN_INPUTS = ("input_ids", "attention_mask", "position_ids")
LOGITS = "logits"


def past_pair(layer: int) -> tuple[str, str]:
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_pair(layer: int) -> tuple[str, str]:
    return f"present.{layer}.key", f"present.{layer}.value"


def past_names(num_layers: int) -> list[str]:
    return [name for i in range(num_layers) for name in past_pair(i)]


def present_names(num_layers: int) -> list[str]:
    return [name for i in range(num_layers) for name in present_pair(i)]


def input_names(num_layers: int) -> list[str]:
    return [*TOKEN_INPUTS, *past_names(num_layers)]


def output_names(num_layers: int) -> list[str]:
    return [LOGITS, *present_names(num_layers)]


def mask_positions(attention_mask: np.ndarray, seq: int) -> np.ndarray:
    """position_ids of the last `seq` tokens: the real tokens before each (left padding safe), from the
    mask over past + seq; `positions_from_mask`'s rule in numpy, for feeds made where torch is not."""
    return np.maximum(attention_mask.cumsum(-1) - 1, 0)[:, attention_mask.shape[1] - seq:]


T = TypeVar("T")


def named_past(flat: Sequence[T], num_layers: int) -> dict[str, T]:
    """The flat cache (k0, v0, k1, v1, ...) keyed by the ONNX input names."""
    if len(flat) != 2 * num_layers:
        raise CqilError(f"past_key_values holds {len(flat)} tensors, expected 2 x {num_layers} layers "
                        "(k0, v0, k1, v1, ...)")
    return dict(zip(past_names(num_layers), flat))


def flat_presents(outputs: Mapping[str, T], num_layers: int) -> tuple[T, ...]:
    """The presents of a run keyed by output name, as the flat cache (k0, v0, k1, v1, ...)."""
    return tuple(outputs[name] for name in present_names(num_layers))


def dynamic_shapes(num_layers: int) -> dict:
    """Mirrors `ContractModule.forward`: the flat past arrives as one `*past` tuple of specs."""
    kv = {0: BATCH, 2: PAST}
    return {
        "input_ids": {0: BATCH, 1: SEQ},
        "attention_mask": {0: BATCH, 1: TOTAL},
        "position_ids": {0: BATCH, 1: SEQ},
        "past": tuple(dict(kv) for _ in range(2 * num_layers)),
    }


def example_inputs(model: CqilModel, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Inputs to trace with: a left-padded decode step over a past of EXAMPLE_PAST tokens."""
    generator = torch.Generator().manual_seed(0)
    batch, seq, past = EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST
    vocab = model.hf.config.vocab_size
    input_ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, past + seq, dtype=torch.long)
    attention_mask[1, :2] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)[:, past:]
    kv = make_cache(model.num_layers, batch, model.num_kv_heads, past, model.head_dim, dtype, generator=generator)
    return (input_ids, attention_mask, position_ids, *kv)


class ContractModule(nn.Module):
    """The exported call: (input_ids, attention_mask, position_ids, *flat_past) -> (logits, *flat_presents).

    An argument adapter over `CqilModel`, whose forward is the one model loop: the layout (branches or
    fused) is the model's pieces and schedule, not a forward of its own.
    """

    def __init__(self, model: CqilModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, presents = self.model(input_ids, attention_mask, position_ids, past)
        return (logits, *presents)


# Model-level metadata_props: what a runtime or `cqil validate` needs to know about the file.
PLAN_KEY = "cqil.plan"  # JSON of Plan.to_dict(): groups, bypass d, the model it was made for
LAYOUT_KEY = "cqil.layout"  # branches | fused
DTYPE_KEY = "cqil.dtype"  # fp32 | fp16: activations and cache (int8/int4 weights run in fp32)
TARGET_KEY = "cqil.target"  # portable (standard operators) | onnxruntime (its contrib operators, the GenAI builder's graph)
PRECISION_KEY = "cqil.precision"  # fp32 | fp16 | int8 | int4: the weights (export.precision)
QUANTIZATION_KEY = "cqil.quantization"  # int8/int4: how the weights were quantized (export.precision.Quantization, JSON)
SOURCE_KEY = "cqil.source_model"  # JSON: the name of the model that was exported
# Beside model.onnx: the exported model's name and resolved path, kept out of the ONNX so that its bytes do not
# depend on where the model folder lies (commands read the path back to find the PyTorch reference).
SOURCE_FILE = "cqil_source.json"
VERSION_KEY = "cqil.tool_version"  # cqil-pipeline version that wrote the file
KV_SHAPE_KEY = "cqil.kv_shape"  # JSON: layers, kv_heads, head_dim of the past/present tensors


def name_total_dims(graph) -> None:
    """Call the presents' sequence axis `total` (past + seq, the attention mask's length) in an onnx_ir graph."""
    import onnx_ir as ir

    for value in graph.outputs:
        if value.name.startswith("present.") and value.shape is not None:
            dims = list(value.shape)
            dims[2] = TOTAL
            value.shape = ir.Shape(dims)


# -- reading a file's contract ------------------------------------------------------------------------

# ONNX element type of the cache -> the numpy dtype a runtime feeds it in.
NUMPY_DTYPES = {"FLOAT": np.float32, "FLOAT16": np.float16}


@dataclass(frozen=True)
class ContractSpec:
    """What a runtime needs to know about an exported decoder, read from its declarations."""

    num_layers: int
    kv_heads: int
    head_dim: int
    kv_dtype: str  # ONNX element type name of the cache, e.g. "FLOAT" or "FLOAT16"
    plan: Plan | None
    inputs: tuple[str, ...]  # the contract inputs the graph declares, in contract order
    metadata: dict[str, str] = field(default_factory=dict)  # the model's metadata_props (cqil.* keys)
    vocab_size: int | None = None  # the logits' last dim, when the graph fixes it
    source: dict = field(default_factory=dict)  # SOURCE_FILE beside the ONNX, when there is one

    def source_model(self) -> dict:
        """The exported model's record (name, path): `cqil.source_model` updated by SOURCE_FILE; {} when absent."""
        try:
            record = json.loads(self.metadata.get(SOURCE_KEY, "{}"))
        except json.JSONDecodeError:
            record = {}
        return {**(record if isinstance(record, dict) else {}), **self.source}

    @property
    def cache_dtype(self) -> type:
        """The numpy dtype of the cache tensors; refuses element types no runtime here feeds."""
        if self.kv_dtype not in NUMPY_DTYPES:
            raise CqilError(f"cache element type {self.kv_dtype} is not supported (export fp32 or fp16)")
        return NUMPY_DTYPES[self.kv_dtype]


def empty_past(spec: ContractSpec, batch: int) -> dict[str, np.ndarray]:
    """A prefill's cache: every past input with past = 0, [batch, kv_heads, 0, head_dim]."""
    empty = np.zeros((batch, spec.kv_heads, 0, spec.head_dim), dtype=spec.cache_dtype)
    return {name: empty for name in past_names(spec.num_layers)}


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
    """Check the graph's inputs against the contract and read the cache geometry and the plan.

    Only the declarations are read (`load_external_data=False`), so this is quick on a 7B export.
    """
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
    for name in past_names(num_layers):
        if name not in inputs or _dims(inputs[name]) != shape:
            raise CqilError(f"'{onnx_path}': input {name} is missing or differs in shape from "
                            f"past_key_values.0.key {shape}")
    elem = inputs["past_key_values.0.key"].type.tensor_type.elem_type
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    declared = tuple(name for name in input_names(num_layers) if name in inputs)
    logits = [_dims(value) for value in model.graph.output if value.name == "logits"]
    vocab = logits[0][-1] if logits and logits[0] and isinstance(logits[0][-1], int) else None
    return ContractSpec(num_layers, shape[1], shape[3], onnx.TensorProto.DataType.Name(elem),
                        plan_from_metadata(metadata, num_layers, onnx_path), declared, metadata, vocab,
                        _source_file(onnx_path.parent / SOURCE_FILE))


def _source_file(path: Path) -> dict:
    """SOURCE_FILE's record; {} when the file is absent or not a JSON object (the metadata's name still holds)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _dims(value) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value.type.tensor_type.shape.dim]


def plan_from_metadata(metadata: Mapping[str, str], num_layers: int, onnx_path: Path) -> Plan | None:
    """The plan stored under `cqil.plan` in a file's metadata_props; None when the file has none."""
    if PLAN_KEY not in metadata:
        return None
    try:
        data = json.loads(metadata[PLAN_KEY])
    except json.JSONDecodeError as exc:
        raise CqilError(f"'{onnx_path}': metadata '{PLAN_KEY}' is not JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CqilError(f"'{onnx_path}': metadata '{PLAN_KEY}' must hold a plan object")
    plan = plan_from_dict(data)
    if plan.num_kept != num_layers:  # the file's cache inputs are the kept layers'
        raise CqilError(f"'{onnx_path}': its plan keeps {plan.num_kept} layers but the file has past inputs "
                        f"for {num_layers}")
    return plan
