"""The ONNX I/O contract of DESIGN.md section 4: names, dynamic shapes, example inputs, call structure.

The names are the ones Hugging Face Optimum and ONNX Runtime GenAI use for decoders with past, so a
runtime written for those can feed our files. One graph serves prefill (past = 0), decode (seq = 1)
and left-padded batches: batch, seq and past are dynamic; the attention mask spans past + seq.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.model.cqil import KV, CqilModel, attention_bias

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
    shape = (batch, model.num_kv_heads, past, model.head_dim)
    kv = [torch.randn(shape, generator=generator).to(dtype) for _ in range(2 * model.num_layers)]
    return (input_ids, attention_mask, position_ids, *kv)


class ContractModule(nn.Module):
    """The exported call: (input_ids, attention_mask, position_ids, *flat_past) -> (logits, *flat_presents).

    Embedding, rotary tables, the causal + padding mask and the head are those of the reference
    CqilModel; a layout subclass supplies `group_step`, the part of the graph that differs.
    """

    def __init__(self, model: CqilModel):
        super().__init__()
        self.model = model

    def group_step(self, index: int, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                   bias: torch.Tensor, past: list[KV]) -> tuple[torch.Tensor, list[KV]]:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hf = self.model.hf
        x = hf.model.embed_tokens(input_ids)
        rope = hf.model.rotary_emb(x, position_ids)
        bias = attention_bias(attention_mask, input_ids.shape[1], x.dtype, self.model.sliding_window)
        presents: list[torch.Tensor] = []
        for index, group in enumerate(self.model.plan.groups):
            x, group_presents = self.group_step(index, x, rope, bias, [(past[2 * i], past[2 * i + 1]) for i in group])
            for k, v in group_presents:
                presents.extend((k, v))
        return (hf.lm_head(hf.model.norm(x)), *presents)


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
