"""Export precisions: fp32 and fp16 are traced in that dtype; int8 and int4 are weight-only quantized
after an fp32 trace by ONNX Runtime's own `MatMulNBitsQuantizer`, set as ONNX Runtime GenAI's model
builder sets it for the CPU (`-p int4 -e cpu`): symmetric blocks of 32 along K, `accuracy_level` 4
(int8 activations inside MatMulNBits on the CPU), and the output layer (the logits) in 8 bits.

The quantizer only reads MatMuls whose weight is an initializer. torch.export writes a tied output
layer as `MatMul(x, Transpose(embedding))` so that the embedding Gather and the logits share one
tensor; `constant_weights` folds that Transpose into a weight of its own (as the builder stores
lm_head apart from the embedding), so the output layer is quantized too. Every other weight of both
layouts is already a constant (the fused layout packs q/k/v and gate/up when it is traced).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from cqil.export.choices import PRECISIONS
from cqil.model.errors import CqilError

TRACE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.float32, "int4": torch.float32}
BITS = {"int8": 8, "int4": 4}
DEFAULT_BLOCK_SIZE = 32
# MatMulNBits' accuracy_level 4: int8 activations x n-bit weights, the CPU kernels the builder picks.
CPU_ACCURACY_LEVEL = 4
OUTPUT_LAYER = "/lm_head/MatMul"
OUTPUT_LAYER_BITS = 8


def check_precision(precision: str, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
    if precision not in PRECISIONS:
        raise CqilError(f"unknown precision '{precision}': use --precision {', '.join(PRECISIONS)}")
    if block_size < 16 or block_size & (block_size - 1):
        raise CqilError(f"--block-size {block_size} must be a power of two, at least 16 (MatMulNBits)")


def is_quantized(precision: str) -> bool:
    return precision in BITS


def constant_weights(graph) -> int:
    """Fold `MatMul(x, Transpose(initializer))` into `MatMul(x, initializer')` in an onnx_ir graph.

    Returns how many weights were folded. The original initializer stays for its other readers
    (the embedding Gather of a tied model).
    """
    import onnx_ir as ir

    folded = 0
    for node in list(graph):
        if node.op_type != "MatMul" or node.inputs[1] is None:
            continue
        transpose = node.inputs[1].producer()
        if transpose is None or transpose.op_type != "Transpose":
            continue
        source = transpose.inputs[0]
        if source.const_value is None or len(source.shape or ()) != 2:
            continue
        perm = transpose.attributes.get("perm")
        if perm is not None and tuple(perm.as_ints()) != (1, 0):
            continue
        array = np.ascontiguousarray(source.const_value.numpy().T)
        weight = ir.Value(name=f"{source.name}.transposed", shape=ir.Shape(array.shape),
                          type=ir.TensorType(source.dtype), const_value=ir.tensor(array))
        graph.register_initializer(weight)
        node.replace_input_with(1, weight)
        if not transpose.outputs[0].uses():
            graph.remove(transpose, safe=True)
        folded += 1
    return folded


def quiet_quantizer() -> None:
    """The quantizer logs every node it visits at INFO through a handler of its own: warnings only."""
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)


def quantize(proto, precision: str, block_size: int = DEFAULT_BLOCK_SIZE):
    """The ModelProto with every constant-weight MatMul as MatMulNBits (`precision` int4 or int8)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quiet_quantizer()

    def run(model, bits: int, **nodes):
        quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                         accuracy_level=CPU_ACCURACY_LEVEL, **nodes)
        quantizer.process()
        return quantizer.model.model

    bits = BITS[precision]
    labels = {node.name: list(node.metadata_props) for node in proto.graph.node if node.op_type == "MatMul"}
    if bits == OUTPUT_LAYER_BITS or OUTPUT_LAYER not in labels:
        quantized = run(proto, bits)
    else:
        quantized = run(run(proto, bits, nodes_to_exclude=[OUTPUT_LAYER]), OUTPUT_LAYER_BITS,
                        nodes_to_include=[OUTPUT_LAYER])
    _keep_labels(quantized, labels)
    return quantized


def _keep_labels(proto, labels: dict) -> None:
    """Give each MatMulNBits (named `<MatMul>_Q4`/`_Q8` by the quantizer) its MatMul's cqil.* node metadata,
    which the branch structure check reads (`export.check`)."""
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits" and not node.metadata_props:
            node.metadata_props.extend(labels.get(node.name.rsplit("_Q", 1)[0], []))
