"""The serving form of an export's graph: logits for the last position only.

The contract's graph returns every position's logits ([rows, tokens, vocab]), which validation needs
(perplexity scores each next token). A server sampling the next token reads only the last position's.
For a prompt the output layer over every position is a fifth of a small model's prefill work (the
default model: a 49k x 576 matrix against 107M other weights per token) and writes tokens x vocab
floats (200 MB for 1024 tokens) nobody reads. Slicing the hidden state to its last position before
the output layer drops both; a decode step (one token) is unchanged. This is what vLLM does when it
computes logits only for the positions it samples.
"""

from __future__ import annotations

import numpy as np
import onnx
from cqil.export.contract import LOGITS
from cqil.model.errors import CqilError
from onnx import helper, numpy_helper

# The output layer's node types in our exports: a plain MatMul (fp32, fp16) or ONNX Runtime's
# quantized MatMulNBits (int8, int4). Both work position by position on their first input.
OUTPUT_LAYER_OPS = {"MatMul", "MatMulNBits"}
SLICE_NAME = "/lm_head/LastPosition"


def keep_last_position_logits(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose `logits` output is [rows, 1, vocab]: the last position's logits.

    Initializers keep their external-data references, so the copy is saved beside the same data files.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    producers = [i for i, node in enumerate(graph.node) if LOGITS in node.output]
    found = graph.node[producers[0]].op_type if producers else "no node"
    if found not in OUTPUT_LAYER_OPS:
        raise CqilError(f"the graph's '{LOGITS}' output comes from {found}, not the output layer's "
                        f"{' or '.join(sorted(OUTPUT_LAYER_OPS))}: give `cqil triton` a `cqil export` folder")
    index, output_layer = producers[0], graph.node[producers[0]]
    hidden, last = output_layer.input[0], f"{output_layer.input[0]}_last_position"
    bounds = {"starts": -1, "ends": np.iinfo(np.int64).max, "axes": 1}
    for role, value in bounds.items():
        graph.initializer.append(numpy_helper.from_array(np.array([value], dtype=np.int64),
                                                         f"{SLICE_NAME}/{role}"))
    slice_node = helper.make_node("Slice", [hidden, *(f"{SLICE_NAME}/{role}" for role in bounds)], [last],
                                  name=SLICE_NAME)
    graph.node.insert(index, slice_node)
    output_layer.input[0] = last
    logits = next(value for value in graph.output if value.name == LOGITS)
    logits.type.tensor_type.shape.dim[1].Clear()
    logits.type.tensor_type.shape.dim[1].dim_value = 1
    return model
