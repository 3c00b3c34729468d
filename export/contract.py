"""The ONNX I/O contract of DESIGN.md section 4: names, dynamic shapes, example inputs, call structure.

The names are the ones Hugging Face Optimum and ONNX Runtime GenAI use for decoders with past, so a
runtime written for those can feed our files. One graph serves prefill (past = 0), decode (seq = 1)
and left-padded batches: batch, seq and past are dynamic; the attention mask spans past + seq.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.model.cqil import CqilModel
from pipeline.model.kv import make_cache

BATCH, SEQ, PAST, TOTAL = "batch", "seq", "past", "total"
# torch.export specializes a dimension whose example size is 0 or 1: keep every example size >= 2.
EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST = 2, 3, 4


TOKEN_INPUTS = ("input_ids", "attention_mask", "position_ids")


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
    return ["logits", *present_names(num_layers)]


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
DTYPE_KEY = "cqil.dtype"  # fp32 | fp16
SOURCE_KEY = "cqil.source_model"  # JSON: name and path of the model that was exported
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
