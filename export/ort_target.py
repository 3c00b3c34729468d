"""`--target onnxruntime`: the graph ONNX Runtime GenAI's model builder writes, with CQIL groups.

The builder (onnxruntime-genai, pinned: BUILDER_VERSION) emits a LLaMA-family decoder in ONNX Runtime's
contrib operators: SkipSimplifiedLayerNormalization for each norm and its residual add,
GroupQueryAttention with rotary embedding and the KV cache inside, MatMulNBits for int4/int8 weights.
Its per-layer loop (`Model.make_layer`) is extended here, composing its own building blocks, so that
a CQIL group (DESIGN.md section 1) becomes:

    x                 the group input: an Add of the previous residual and its last terms
    a_j               input norm of layer j on x (SimplifiedLayerNormalization), the builder's attention of j
    s_j = a_j + b_j   Add nodes: the bypass adds the up-to-d earlier attention outputs of the group
    f_j               SkipSimplifiedLayerNorm(x, s_j) -> the builder's MLP of layer j
    out = x + sum_j (a_j + f_j): the sum goes in as the skip input of the next norm

A group of one layer is the builder's own layer, so the original model's export is the builder's.
The builder reads the weights from an HF folder: the model (possibly a merged CQIL checkpoint) is saved
to a temporary one first. The builder's class for the family is swapped for the CQIL subclass only
while its `create_model` runs.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
from pathlib import Path

from cqil.model.cqil import CqilModel
from cqil.model.errors import CqilError
from cqil.model.plan import Plan

BUILDER_VERSION = "0.18.0"
# HF architecture -> the builder class that `create_model` dispatches it to.
BUILDER_CLASSES = {"LlamaForCausalLM": "LlamaModel", "MistralForCausalLM": "MistralModel",
                   "Qwen2ForCausalLM": "QwenModel"}
BUILDER_PRECISIONS = {"fp32": "fp32", "fp16": "fp16", "int8": "int8", "int4": "int4"}


def check_builder(config) -> None:
    """Refuse (before any work) what this target cannot build: another builder version or family, a sliding window."""
    import onnxruntime_genai

    architecture = config.architectures[0] if getattr(config, "architectures", None) else ""
    if onnxruntime_genai.__version__ != BUILDER_VERSION:
        raise CqilError(f"--target onnxruntime extends the model builder of onnxruntime-genai {BUILDER_VERSION}, "
                        f"found {onnxruntime_genai.__version__}: pip install onnxruntime-genai=={BUILDER_VERSION}")
    if architecture not in BUILDER_CLASSES:
        raise CqilError(f"--target onnxruntime supports {', '.join(BUILDER_CLASSES)}, not {architecture}")
    window = getattr(config, "sliding_window", None)
    if window and window < config.max_position_embeddings:
        # Measured on a tiny Mistral (window 5): the builder's GroupQueryAttention local window lets
        # position 5 on see one more token than transformers does, so its logits differ past the window.
        raise CqilError(f"--target onnxruntime: the model builder's sliding window ({window}) does not match "
                        "transformers' past the window; use --target portable for this model")


def cqil_builder_class(base: type, plan: Plan) -> type:
    """A subclass of the builder's model class whose layer loop runs `plan`'s groups."""
    first_of = {group[0]: group for group in plan.groups if len(group) > 1}
    inside = {layer for group in first_of.values() for layer in group[1:]}

    class CqilBuilderModel(base):
        def make_layer(self, layer_id, layer):
            if layer_id in inside:
                self._cqil_pending.append(layer)
                if len(self._cqil_pending) == len(self._cqil_group):
                    self._make_group(self._cqil_group, self._cqil_pending)
                return
            if layer_id in first_of:
                self._cqil_group, self._cqil_pending = first_of[layer_id], [layer]
                return
            super().make_layer(layer_id, layer)

        def _make_group(self, ids: tuple[int, ...], layers: list) -> None:
            attrs, simple = self.layernorm_attrs, self.layernorm_attrs["simple"]
            shape = self.make_hidden_state_shape()
            x = attrs["root_input"]  # the embeddings, or the previous residual sum plus its last terms:
            if not attrs["first_layernorm"]:  # an Add of its own, so that no branch owns the group input
                x = self._add(f"/model/layers.{ids[0]}/group_input/Add", x, attrs["skip_input"], shape)
            attention = []
            for layer_id, layer in zip(ids, layers):
                attrs["root_input"] = x
                self.make_layernorm(layer_id, layer.input_layernorm, skip=False, simple=simple, location="input")
                self.make_attention(layer_id, self.get_attn_module(layer_id, layer), root_input=attrs["output_0"])
                attention.append(attrs["skip_input"])
            terms = []
            for index, (layer_id, layer) in enumerate(zip(ids, layers)):
                s = attention[index]
                for source in range(max(0, index - plan.bypass), index):
                    s = self._add(f"/model/layers.{layer_id}/bypass/Add_{source}", s, attention[source], shape)
                attrs["root_input"], attrs["skip_input"] = x, s
                self.make_layernorm(layer_id, layer.post_attention_layernorm, skip=True, simple=simple,
                                    location="post_attention")
                self.make_mlp(layer_id, self.get_mlp_module(layer_id, layer), root_input=attrs["output_0"])
                terms.append(self._add(f"/model/layers.{layer_id}/combine/Add", attention[index],
                                       attrs["skip_input"], shape))
            total = terms[0]
            for index, term in enumerate(terms[1:], 1):
                total = self._add(f"/model/layers.{ids[index]}/combine/Sum", total, term, shape)
            attrs["root_input"], attrs["skip_input"] = x, total
            attrs["first_layernorm"] = False
            if ids[-1] == self.num_layers - 1:
                attrs["last_layernorm"] = True

        def _add(self, name: str, a: str, b: str, shape) -> str:
            self.make_add(name, [a, b], self.io_dtype, shape)
            return f"{name}/output_0"

    return CqilBuilderModel


def build(model: CqilModel, out: Path, precision: str, block_size: int, tokenizer=None) -> None:
    """Write the builder's files (model.onnx, model.onnx.data, genai_config.json, tokenizer) for `model` into `out`."""
    from unittest import mock

    from cqil.export.precision import quiet_quantizer
    from onnxruntime_genai.models import builder

    check_builder(model.hf.config)
    architecture = model.hf.config.architectures[0]
    base = getattr(builder, BUILDER_CLASSES[architecture])
    with tempfile.TemporaryDirectory() as source, tempfile.TemporaryDirectory() as cache:
        model.hf.save_pretrained(source)
        if tokenizer is not None:
            tokenizer.save_pretrained(source)
        # The builder's defaults otherwise, the logits layer included: its 8-bit option
        # (matmul_mixed_precision=last_matmul:int8) writes a graph ONNX Runtime refuses when the
        # embeddings are tied (SmolLM2; measured with 0.18.0), so at int4 it stays 4-bit as in the builder's export.
        options = [f"block_size={block_size}", "accuracy_level=4"] if precision in ("int4", "int8") else []
        quiet = io.StringIO()
        quiet_quantizer()
        with mock.patch.object(builder, BUILDER_CLASSES[architecture], cqil_builder_class(base, model.plan)), \
                contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet), mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1"}):
            parsed = builder.parse_extra_options(None, source, str(out), BUILDER_PRECISIONS[precision], "cpu",
                                                 cache, options)
            builder.create_model(None, source, str(out), BUILDER_PRECISIONS[precision], "cpu", cache, **parsed)


# The builder's node names: /model/layers.{i}/{part}/...; part -> the cqil.role of export.naming.
LAYER_NODE = re.compile(r"^/model/layers\.(\d+)/([a-z_]+)/(.*)$")
BRANCH_ROLES = {"input_layernorm": "attn_norm", "attn": "attn", "post_attention_layernorm": "ffn_norm", "mlp": "ffn",
                "bypass": "bypass"}


def label_nodes(graph, plan: Plan) -> None:
    """Name and label the builder's nodes as `export.naming` does the portable ones (in place, a GraphProto).

    A layer's nodes are its branch (`/g{group}/l{layer}/{role}/...`, cqil.group/branch/layer/role).
    What joins groups is group-level `combine` (no branch): the sums of a group's terms, the Add that
    makes the next group's input, and a SkipSimplifiedLayerNorm that adds a one-layer group's terms
    to the residual while normalizing for the next layer (for the final norm, the last group's).
    """
    from cqil.export.naming import BRANCH, GROUP, LAYER, ROLE

    group_of = {layer: (index, position) for index, group in enumerate(plan.groups)
                for position, layer in enumerate(group)}
    layers = len(group_of)
    for node in graph.node:
        match = LAYER_NODE.match(node.name)
        if match is None:
            continue
        layer, part, rest = int(match.group(1)), match.group(2), match.group(3)
        joins = part in ("group_input", "combine", "final_norm_layernorm") or (
            part == "input_layernorm" and node.op_type.startswith("Skip"))
        if joins:
            owner = group_of[layer][0] - (part != "combine") if layer < layers else len(plan.groups) - 1
            meta = {GROUP: str(owner), LAYER: ",".join(map(str, plan.groups[owner])), ROLE: "combine"}
            node.name = f"/g{owner}/combine/l{layer}/{part}/{rest}"
        elif part in BRANCH_ROLES:
            index, position = group_of[layer]
            meta = {GROUP: str(index), BRANCH: str(position), LAYER: str(layer), ROLE: BRANCH_ROLES[part]}
            node.name = f"/g{index}/l{layer}/{BRANCH_ROLES[part]}/{rest}"
        else:
            continue
        for key, value in meta.items():
            node.metadata_props.add(key=key, value=value)


def fix_cache_dims(graph, head_dim: int) -> None:
    """The builder declares the cache's last dim symbolic (`kv_cache_dim`); the contract fixes it to head_dim."""
    for value in [*graph.input, *graph.output]:
        if value.name.startswith(("past_key_values.", "present.")):
            value.type.tensor_type.shape.dim[3].dim_value = head_dim


def finish(folder: Path, plan: Plan, metadata: dict[str, str], head_dim: int) -> int:
    """Label the builder's model.onnx in `folder` for the branch check and add the cqil.* model metadata.

    Only the graph file is rewritten: the weights stay in the builder's external data file.
    Returns the node count.
    """
    import onnx

    path = Path(folder) / "model.onnx"
    proto = onnx.load(str(path), load_external_data=False)
    label_nodes(proto.graph, plan)
    fix_cache_dims(proto.graph, head_dim)
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))
    return len(proto.graph.node)
