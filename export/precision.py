"""Export precisions: fp32 and fp16 are traced in that dtype; int8 and int4 are weight-only quantized
after an fp32 trace by ONNX Runtime's own `MatMulNBitsQuantizer` (MatMulNBits nodes, blocks along K,
`accuracy_level` 4 by default: int8 activations inside MatMulNBits on the CPU, the kernels ONNX
Runtime GenAI's model builder picks for `-p int4 -e cpu`).

int4 (`Quantization`, the `export.*` settings): the 4-bit method is ORT's round-to-nearest
(`rtn`, symmetric, the builder's) or its HQQ (`hqq`: half-quadratic, asymmetric with float zero
points, no calibration data); the matmuls named in `int8_matmuls` (by projection: `lm_head`,
`down_proj`, `v_proj`, ...) stay 8-bit, as the builder keeps the output layer and llama.cpp's
Q4_K_M keeps down_proj and v_proj in more bits. docs/export.md has the measured table that chose
the default.

The quantizer only reads MatMuls whose weight is an initializer. torch.export writes a tied output
layer as `MatMul(x, Transpose(embedding))` so that the embedding Gather and the logits share one
tensor; `constant_weights` folds that Transpose into a weight of its own (as the builder stores
lm_head apart from the embedding), so the output layer is quantized too. Every other weight of both
layouts is already a constant (the fused layout packs q/k/v and gate/up when it is traced).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

from cqil.export.choices import PRECISIONS
from cqil.model.errors import CqilError
from cqil.model.settings import Check

# The torch dtype each precision is traced in, by name (this module stays light: `cqil export --help` reads it).
TRACE_DTYPES = {"fp32": "float32", "fp16": "float16", "int8": "float32", "int4": "float32"}
BITS = {"int8": 8, "int4": 4}
INT4_METHODS = ("rtn", "hqq")
# MatMulNBits' accuracy_level: 0 = the kernel's default (fp32 activations), 4 = int8 activations on the CPU.
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
# What int8_matmuls may name: the output layer and the projections of a LLaMA-style layer.
MATMUL_NAMES = ("lm_head", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Quantization:
    """How the int8/int4 weights are made; `method` and `int8_matmuls` apply to int4 only."""

    method: str = "rtn"
    block_size: int = 32
    accuracy_level: int = 4
    int8_matmuls: tuple[str, ...] = ("lm_head", "q_proj", "k_proj", "v_proj", "o_proj", "down_proj")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


DEFAULT_QUANTIZATION = Quantization()


def builder_quantization(block_size: int) -> Quantization:
    """What the onnxruntime target's int4 is: the GenAI model builder quantizes its own graph (export.ort_target),
    round to nearest, every weight 4-bit at accuracy level 4, whatever `method`/`int8_matmuls` say."""
    return Quantization(method="rtn", block_size=block_size, accuracy_level=4, int8_matmuls=())


def parse_matmul_names(text: str, option: str = "--int8-matmuls") -> tuple[str, ...]:
    """`int8_matmuls` from its comma-separated spelling ("" = none)."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in MATMUL_NAMES]
    if unknown:
        raise CqilError(f"{option}: unknown matmul '{unknown[0]}': use a comma-separated list of "
                        f"{', '.join(MATMUL_NAMES)} (or '' for none)")
    return names


# The check of the int8_matmuls setting: the list, spaces dropped, or one line naming the unknown name.
MATMUL_LIST = Check(lambda text, option: ",".join(parse_matmul_names(text, option)),
                    "a comma-separated list of matmul names", named=True)


def check_precision(precision: str, quantization: Quantization = DEFAULT_QUANTIZATION) -> None:
    if precision not in PRECISIONS:
        raise CqilError(f"unknown precision '{precision}': use --precision {', '.join(PRECISIONS)}")
    block_size = quantization.block_size
    if block_size < 16 or block_size & (block_size - 1):
        raise CqilError(f"--block-size {block_size} must be a power of two, at least 16 (MatMulNBits)")
    if quantization.method not in INT4_METHODS:
        raise CqilError(f"unknown --int4-method '{quantization.method}': use {' or '.join(INT4_METHODS)}")
    if quantization.accuracy_level not in ACCURACY_LEVELS:
        raise CqilError(f"--accuracy-level {quantization.accuracy_level} is not a MatMulNBits accuracy level: use "
                        f"{', '.join(map(str, ACCURACY_LEVELS))}")


# Target x precision combinations that no tool the export is for can run, refused before any work. Measured
# on tiny models (tests/export/test_export.py): every other combination runs in an ONNX Runtime CPU
# InferenceSession, ONNX Runtime GenAI's Generator and Optimum's ORTModelForCausalLM.
UNRUNNABLE = {
    ("onnxruntime", "fp16"): "the GenAI model builder's fp16 graph is for GPUs: on the CPU, ONNX Runtime (and so GenAI "
                             "and Optimum) fails at the first run in a Cast it inserts",
}


def check_target_precision(target: str, precision: str) -> None:
    reason = UNRUNNABLE.get((target, precision))
    if reason:
        runnable = ", ".join(p for p in PRECISIONS if (target, p) not in UNRUNNABLE)
        raise CqilError(f"--target {target} --precision {precision}: {reason}; use --precision {runnable} "
                        f"(or --target portable --precision {precision})")


def is_quantized(precision: str) -> bool:
    return precision in BITS


def constant_weights(graph) -> int:
    """Fold `MatMul(x, Transpose(initializer))` into `MatMul(x, initializer')` in an onnx_ir graph.

    Returns how many weights were folded. The original initializer stays for its other readers
    (the embedding Gather of a tied model).
    """
    import numpy as np
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


def _named(node, names: tuple[str, ...], initializers: set[str]) -> bool:
    """Whether a constant-weight MatMul is one of `names`: by its node name or its weight's name
    (`/g3/l4/ffn/down_proj/MatMul`, `...mlp.down_proj.weight`)."""
    if node.input[1] not in initializers:
        return False
    text = f"{node.name} {node.input[1]}"
    return any(f"/{name}/" in text or f".{name}." in text or text.startswith(f"/{name}/") for name in names)


def int8_nodes(proto, names: tuple[str, ...]) -> list[str]:
    """The MatMuls of an fp32 graph that an int4 export keeps 8-bit."""
    initializers = {init.name for init in proto.graph.initializer}
    return [node.name for node in proto.graph.node if node.op_type == "MatMul" and _named(node, names, initializers)]


def quantize(proto, precision: str, quantization: Quantization = DEFAULT_QUANTIZATION):
    """The ModelProto with every constant-weight MatMul as MatMulNBits (`precision` int4 or int8)."""
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    quiet_quantizer()
    q = quantization

    def default(bits: int):
        return nbits.DefaultWeightOnlyQuantConfig(block_size=q.block_size, is_symmetric=True,
                                                  accuracy_level=q.accuracy_level, bits=bits)

    def run(model, config, exclude=()):
        quantizer = nbits.MatMulNBitsQuantizer(model, bits=config.bits, block_size=q.block_size, is_symmetric=True,
                                               accuracy_level=q.accuracy_level, nodes_to_exclude=list(exclude),
                                               algo_config=config)
        quantizer.process()
        return quantizer.model.model

    labels = {node.name: list(node.metadata_props) for node in proto.graph.node if node.op_type == "MatMul"}
    if BITS[precision] == 8:
        quantized = run(proto, default(8))
    else:
        keep = int8_nodes(proto, q.int8_matmuls)
        body = default(4) if q.method == "rtn" else nbits.HQQWeightOnlyQuantConfig(block_size=q.block_size, bits=4)
        quantized = run(proto, body, exclude=keep)
        if keep:  # every other constant-weight MatMul is MatMulNBits by now
            quantized = run(quantized, default(8))
    _set_accuracy_level(quantized, q.accuracy_level)
    _keep_labels(quantized, labels)
    return quantized


def _set_accuracy_level(proto, level: int) -> None:
    """ORT's HQQ writes no accuracy_level (0: fp32 activations); give every MatMulNBits the one asked for."""
    import onnx

    if not level:
        return
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits" and not any(attr.name == "accuracy_level" for attr in node.attribute):
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))


def _keep_labels(proto, labels: dict) -> None:
    """Give each MatMulNBits (named `<MatMul>_Q4`/`_Q8` by the quantizer) its MatMul's cqil.* node metadata,
    which the branch structure check reads (`export.check`)."""
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits" and not node.metadata_props:
            node.metadata_props.extend(labels.get(node.name.rsplit("_Q", 1)[0], []))


def recorded_quantization(metadata: dict[str, str]) -> Quantization:
    """The `Quantization` an int8/int4 file was written with (its cqil.quantization metadata); files written
    before that key existed were quantized as the GenAI model builder does (RTN, logits layer 8-bit)."""
    from cqil.export.contract import QUANTIZATION_KEY

    if QUANTIZATION_KEY not in metadata:
        return Quantization(method="rtn", int8_matmuls=("lm_head",))
    record = json.loads(metadata[QUANTIZATION_KEY])
    return Quantization(**{**record, "int8_matmuls": tuple(record["int8_matmuls"])})
