"""Small ONNX decoders that follow the cqil I/O contract (DESIGN.md section 4), for the Triton tests.

`write_toy_decoder` hand-builds a graph in milliseconds: not a transformer, but every output depends
on every input (logits on ids, positions, mask and the past; each present is past ++ a projection of
the new tokens), its weights are external data, and the plan rides in `metadata_props`.
`export_cqil_model` exports a real tiny CqilModel with the dynamo exporter (~30 s), for the
real-server test that compares logits with PyTorch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from cqil.export.contract import PLAN_KEY, input_names, output_names
from cqil.model.plan import Plan

TOY_LAYERS, TOY_KV_HEADS, TOY_HEAD_DIM, TOY_HIDDEN, TOY_VOCAB = 2, 2, 4, 8, 16
TOY_PLAN = Plan(((0, 1),), bypass=1)


def write_toy_decoder(path: Path, plan: Plan | None = TOY_PLAN, external_data: bool = True,
                      drop_output: str | None = None) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    layers, heads, head_dim, hidden, vocab = TOY_LAYERS, TOY_KV_HEADS, TOY_HEAD_DIM, TOY_HIDDEN, TOY_VOCAB
    weights = {"embed": rng.normal(size=(vocab, hidden)), "head": rng.normal(size=(hidden, vocab))}
    for name in input_names(layers)[3:]:
        weights[f"w.{name}"] = rng.normal(size=(hidden, heads * head_dim))
    initializers = [numpy_helper.from_array(value.astype(np.float32), name) for name, value in weights.items()]
    initializers += [numpy_helper.from_array(np.array(v, dtype=np.int64), n) for n, v in
                     (("axis_last", [-1]), ("axis_1", [1]), ("axes_12", [1, 2]), ("axes_123", [1, 2, 3]),
                      ("kv_shape", [0, 0, heads, head_dim]))]
    initializers.append(numpy_helper.from_array(np.array(0.1, dtype=np.float32), "scale"))

    node = helper.make_node
    nodes = [
        node("Gather", ["embed", "input_ids"], ["x_ids"]),
        node("Cast", ["position_ids"], ["pos_f"], to=TensorProto.FLOAT),
        node("Unsqueeze", ["pos_f", "axis_last"], ["pos_col"]),
        node("Mul", ["pos_col", "scale"], ["pos_term"]),
        node("Add", ["x_ids", "pos_term"], ["x"]),
        node("MatMul", ["x", "head"], ["logits_x"]),
        node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        node("ReduceSum", ["mask_f", "axis_1"], ["mask_sum"], keepdims=0),
        node("ReduceSum", ["past_key_values.0.key", "axes_123"], ["past_sum"], keepdims=0),
        node("Add", ["mask_sum", "past_sum"], ["context"]),
        node("Unsqueeze", ["context", "axes_12"], ["context_b11"]),
        node("Mul", ["context_b11", "scale"], ["context_term"]),
        node("Add", ["logits_x", "context_term"], ["logits"]),
    ]
    for past, present in zip(input_names(layers)[3:], output_names(layers)[1:]):
        nodes += [
            node("MatMul", ["x", f"w.{past}"], [f"{present}.proj"]),
            node("Reshape", [f"{present}.proj", "kv_shape"], [f"{present}.bshd"]),
            node("Transpose", [f"{present}.bshd"], [f"{present}.new"], perm=[0, 2, 1, 3]),
            node("Concat", [past, f"{present}.new"], [present], axis=2),
        ]

    def value(name, dtype, dims):
        return helper.make_tensor_value_info(name, dtype, dims)

    inputs = [value("input_ids", TensorProto.INT64, ["batch", "seq"]),
              value("attention_mask", TensorProto.INT64, ["batch", "total"]),
              value("position_ids", TensorProto.INT64, ["batch", "seq"])]
    inputs += [value(name, TensorProto.FLOAT, ["batch", heads, "past", head_dim]) for name in input_names(layers)[3:]]
    outputs = [value("logits", TensorProto.FLOAT, ["batch", "seq", vocab])]
    outputs += [value(name, TensorProto.FLOAT, ["batch", heads, "total", head_dim]) for name in output_names(layers)[1:]]
    outputs = [o for o in outputs if o.name != drop_output]
    graph = helper.make_graph(nodes, "toy_decoder", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    if plan is not None:
        helper.set_model_props(model, {PLAN_KEY: json.dumps(plan.to_dict())})
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=external_data, all_tensors_to_one_file=True,
                    location=f"{path.name}.data", size_threshold=128)
    return path


def toy_feed(batch: int = 2, seq: int = 3, past: int = 2, seed: int = 1) -> dict[str, np.ndarray]:
    """Left-padded inputs for the toy decoder (row 1 starts with one padding token)."""
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, past + seq), dtype=np.int64)
    mask[1:, 0] = 0
    feed = {"input_ids": rng.integers(0, TOY_VOCAB, (batch, seq)).astype(np.int64),
            "attention_mask": mask,
            "position_ids": np.maximum(mask.cumsum(-1) - 1, 0)[:, past:]}
    for name in input_names(TOY_LAYERS)[3:]:
        feed[name] = rng.normal(size=(batch, TOY_KV_HEADS, past, TOY_HEAD_DIM)).astype(np.float32)
    return feed


def export_cqil_model(model, path: Path) -> Path:
    """Export a CqilModel with the contract's names and dynamic batch/seq/past (examples >= 2, so
    torch.export does not specialize them), weights as external data, plan in metadata_props."""
    import warnings

    import onnx
    import torch

    layers = model.num_layers
    kv = {0: "batch", 2: "past"}

    class Contract(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            logits, presents = self.model(input_ids, attention_mask, position_ids, list(past))
            return (logits, *presents)

    batch, seq, past = 2, 3, 4
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.hf.config.vocab_size, (batch, seq), generator=generator)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    positions = torch.arange(past, past + seq).repeat(batch, 1)
    cache = [torch.randn(batch, model.num_kv_heads, past, model.head_dim, generator=generator)
             for _ in range(2 * layers)]
    shapes = ({0: "batch", 1: "seq"}, {0: "batch", 1: "total"}, {0: "batch", 1: "seq"},
              tuple(dict(kv) for _ in range(2 * layers)))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(Contract().eval(), (ids, mask, positions, *cache), dynamo=True,
                                    dynamic_shapes=shapes, input_names=input_names(layers),
                                    output_names=output_names(layers), report=False, verbose=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=True)
    proto = onnx.load(str(path), load_external_data=False)
    onnx.helper.set_model_props(proto, {PLAN_KEY: json.dumps(model.plan.to_dict())})
    onnx.save(proto, str(path))
    return path
