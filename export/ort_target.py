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

The fused layout (`layout="fused"`) writes a group as fewer, wider operators, with the same math:

    n, x              one SkipSimplifiedLayerNorm: the group input x (previous residual + last terms) and
                      its norm with unit scale; each layer's input-norm scale is folded (fp32) into its q/k/v
    qkv               ONE MatMul for q/k/v of all p layers (weights concatenated along N, layer-major:
                      q_0 k_0 v_0 q_1 ...), one Split into the p packed q/k/v inputs
    a_j               the builder's GroupQueryAttention and o_proj of layer j (each layer keeps its cache)
    s_j, m_j          bypass Adds as above; SkipSimplifiedLayerNorm(x, s_j) -> gate_j, up_j, SiLU, Mul
    f                 ONE MatMul for the down projections of all layers: Concat(m_0..m_{p-1}) along K
                      against the down weights concatenated along K is sum_j f_j
    out = x + (sum_j a_j + f): the parenthesis goes in as the skip input of the next norm

Why gate/up stay per layer: each layer's FFN reads its own input x + a_j + b_j, so a single operator
for all of them would read p-fold zero blocks (block-diagonal weight) or compute p-fold products.
Why attention stays per layer: ONNX Runtime GenAI gives every layer its own [batch, kv_heads, max_len,
head_dim] cache buffer, written in place by that layer's GroupQueryAttention; one attention over
p * heads heads would need a group cache GenAI does not allocate.

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
import types
from pathlib import Path

import torch
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


def cqil_builder_class(base: type, plan: Plan, layout: str = "branches") -> type:
    """A subclass of the builder's model class whose layer loop runs `plan`'s groups in `layout`."""
    first_of = {group[0]: group for group in plan.groups if len(group) > 1}
    inside = {layer for group in first_of.values() for layer in group[1:]}

    class CqilBuilderModel(base):
        def make_layer(self, layer_id, layer):
            if layer_id in inside:
                self._cqil_pending.append(layer)
                if len(self._cqil_pending) == len(self._cqil_group):
                    make = self._make_fused_group if layout == "fused" else self._make_group
                    make(self._cqil_group, self._cqil_pending)
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
                self._bypass_and_norm(layer_id, layer, index, attention, x, simple)
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

        def _make_fused_group(self, ids: tuple[int, ...], layers: list) -> None:
            attrs, shape, first = self.layernorm_attrs, self.make_hidden_state_shape(), ids[0]
            base_name = f"/model/layers.{first}"
            n, x = self._shared_norm(f"{base_name}/group_attn_norm", layers[0].input_layernorm)
            attention = [self.get_attn_module(layer_id, layer) for layer_id, layer in zip(ids, layers)]
            packed = self._packed_qkv(f"{base_name}/group_attn/qkv_proj", attention, layers, n)
            a = []
            for layer_id, module, qkv in zip(ids, attention, packed):
                self.attention_attrs.update(q_path=qkv, k_path="", v_path="")
                window = self.window_size  # as the builder's make_attention does
                self.window_size = window if self.is_local(layer_id) else -1
                try:
                    self.make_attention_qk_subgraph(layer_id, module, n)
                    self.make_attention_output_proj(layer_id, module, n)
                finally:
                    self.window_size = window
                a.append(attrs["skip_input"])
            activations = []
            for index, (layer_id, layer) in enumerate(zip(ids, layers)):
                s = self._bypass_and_norm(layer_id, layer, index, a, x, attrs["simple"])
                activations.append(self._gated(layer_id, self.get_mlp_module(layer_id, layer), attrs["output_0"]))
                if index == len(ids) - 1 and plan.bypass >= index:
                    a_sum = s  # the last layer's bypass sum already holds every a_j
            if plan.bypass < len(ids) - 1:
                a_sum = a[0]
                for index in range(1, len(ids)):
                    a_sum = self._add(f"/model/layers.{first}/combine/Add_{index}", a_sum, a[index], shape)
            f = self._wide_down(f"{base_name}/group_ffn", [self.get_mlp_module(i, layer) for i, layer in zip(ids, layers)],
                                activations)
            attrs["root_input"], attrs["skip_input"] = x, self._add(f"{base_name}/combine/Sum", a_sum, f, shape)
            attrs["first_layernorm"] = False
            if ids[-1] == self.num_layers - 1:
                attrs["last_layernorm"] = True

        def _bypass_and_norm(self, layer_id: int, layer, index: int, attention: list[str], x: str,
                             simple: bool) -> str:
            """Layer `index` of a group: its attention output plus those of the `plan.bypass` layers before it
            (DESIGN.md section 1), added to the group input `x` and normalized (SkipSimplifiedLayerNorm, the
            FFN's input in attrs["output_0"]); returns the attention sum."""
            s = attention[index]
            for source in range(max(0, index - plan.bypass), index):
                s = self._add(f"/model/layers.{layer_id}/bypass/Add_{source}", s, attention[source],
                              self.make_hidden_state_shape())
            self.layernorm_attrs["root_input"], self.layernorm_attrs["skip_input"] = x, s
            self.make_layernorm(layer_id, layer.post_attention_layernorm, skip=True, simple=simple,
                                location="post_attention")
            return s

        def _shared_norm(self, name: str, norm) -> tuple[str, str]:
            """(normalized x with unit scale, x): a SkipSimplifiedLayerNorm that adds the previous terms,
            or for the first group a SimplifiedLayerNorm of the embeddings."""
            attrs = self.layernorm_attrs
            ones = f"{name[1:].replace('/', '.')}.weight"
            self.make_initializer(torch.ones_like(norm.weight), ones, to=self.io_dtype)
            normed, total = f"{name}/output_0", f"{name}/output_3"
            if attrs["first_layernorm"]:
                self.make_node("SimplifiedLayerNormalization", inputs=[attrs["root_input"], ones], outputs=[normed],
                               name=f"{name}/LayerNorm", epsilon=attrs["epsilon"], axis=-1, stash_type=1)
                total = attrs["root_input"]
            else:
                self.make_node("SkipSimplifiedLayerNormalization", inputs=[attrs["root_input"], attrs["skip_input"], ones],
                               outputs=[normed, "", "", total], name=f"{name}/SkipLayerNorm", domain="com.microsoft",
                               epsilon=attrs["epsilon"])
                self.make_value(total, self.io_dtype, shape=self.make_hidden_state_shape())
            self.make_value(normed, self.io_dtype, shape=self.make_hidden_state_shape())
            return normed, total

        def _packed_qkv(self, name: str, attention: list, layers: list, normed: str) -> list[str]:
            """One MatMul (+ bias Add) for q/k/v of every layer, input-norm scales folded; split per layer."""
            weights, biases = [], []
            for module, layer in zip(attention, layers):
                scale = layer.input_layernorm.weight.detach().to(torch.float32)[None, :]
                for proj in (module.q_proj, module.k_proj, module.v_proj):
                    weights.append(proj.weight.detach().to(torch.float32) * scale)
                    biases.append(proj.bias)
            matmul = self.make_matmul(types.SimpleNamespace(weight=torch.cat(weights)), f"{name}/MatMul", normed)
            output = f"{matmul}/output_0"
            if any(bias is not None and torch.count_nonzero(bias) > 0 for bias in biases):
                width = [weight.shape[0] for weight in weights]
                bias = torch.cat([torch.zeros(w) if b is None else b.detach().to(torch.float32)
                                  for b, w in zip(biases, width)])
                self.make_add_bias(bias, f"{name}/Add", root_input=output)
                output = f"{name}/Add/output_0"
            parts = [f"{name}/Split/output_{j}" for j in range(len(layers))]
            width = self.q_size + 2 * self.kv_size
            self.make_split(f"{name}/Split", [output], parts, [self.io_dtype] * len(parts),
                            [self.make_hidden_state_shape(last_dim=width)] * len(parts), num_outputs=len(parts))
            return parts

        def _gated(self, layer_id: int, mlp, normed: str) -> str:
            """act(gate(h)) * up(h) of one layer, the builder's nodes up to its down projection."""
            outputs = []
            for part, proj in (("gate_proj", mlp.gate_proj), ("up_proj", mlp.up_proj)):
                name = f"/model/layers.{layer_id}/mlp/{part}"
                outputs.append(f"{self.make_matmul(proj, f'{name}/MatMul', normed)}/output_0")
                if proj.bias is not None and torch.count_nonzero(proj.bias) > 0:
                    self.make_add_bias(proj.bias, f"{name}/Add", root_input=outputs[-1])
                    outputs[-1] = f"{name}/Add/output_0"
            act = self.make_activation(layer_id, root_input=outputs[0])
            mul = f"/model/layers.{layer_id}/mlp/Mul"
            self.make_mul(mul, [f"{act}/output_0", outputs[1]], dtype=self.io_dtype,
                          shape=self.make_hidden_state_shape(last_dim=self.intermediate_size))
            return f"{mul}/output_0"

        def _wide_down(self, name: str, mlps: list, activations: list[str]) -> str:
            """sum_j down_j(m_j) as one MatMul: Concat(m_j) along K times the down weights stacked along K."""
            concat = f"{name}/Concat"
            self.make_concat(concat, activations, self.io_dtype,
                             self.make_hidden_state_shape(last_dim=self.intermediate_size * len(mlps)), axis=-1)
            weight = torch.cat([mlp.down_proj.weight.detach() for mlp in mlps], dim=1)
            matmul = self.make_matmul(types.SimpleNamespace(weight=weight), f"{name}/down_proj/MatMul", f"{concat}/output_0")
            biases = [mlp.down_proj.bias for mlp in mlps if mlp.down_proj.bias is not None]
            if not biases:
                return f"{matmul}/output_0"
            self.make_add_bias(sum(bias.detach().to(torch.float32) for bias in biases), f"{name}/down_proj/Add",
                               root_input=f"{matmul}/output_0")
            return f"{name}/down_proj/Add/output_0"

        def _add(self, name: str, a: str, b: str, shape) -> str:
            self.make_add(name, [a, b], self.io_dtype, shape)
            return f"{name}/output_0"

    return CqilBuilderModel


def build(model: CqilModel, out: Path, precision: str, block_size: int, tokenizer=None,
          layout: str = "branches") -> None:
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
        with mock.patch.object(builder, BUILDER_CLASSES[architecture], cqil_builder_class(base, model.plan, layout)), \
                contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet), mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1"}):
            parsed = builder.parse_extra_options(None, source, str(out), BUILDER_PRECISIONS[precision], "cpu",
                                                 cache, options)
            builder.create_model(None, source, str(out), BUILDER_PRECISIONS[precision], "cpu", cache, **parsed)


# The builder's node names: /model/layers.{i}/{part}/...; part -> the cqil.role of export.naming.
LAYER_NODE = re.compile(r"^/model/layers\.(\d+)/([a-z_]+)/(.*)$")
BRANCH_ROLES = {"input_layernorm": "attn_norm", "attn": "attn", "post_attention_layernorm": "ffn_norm", "mlp": "ffn",
                "bypass": "bypass"}
# The fused layout's group-wide nodes (named after the group's first layer): part -> role, no branch.
GROUP_ROLES = {"group_attn_norm": "attn_norm", "group_attn": "attn", "group_ffn": "ffn"}


def label_nodes(graph, plan: Plan) -> None:
    """Name and label the builder's nodes as `export.naming` does the portable ones (in place, a GraphProto).

    A layer's nodes are its branch (`/g{group}/l{layer}/{role}/...`, cqil.group/branch/layer/role).
    What joins groups is group-level `combine` (no branch): the sums of a group's terms, the Add that
    makes the next group's input, and a SkipSimplifiedLayerNorm that adds a one-layer group's terms
    to the residual while normalizing for the next layer (for the final norm, the last group's).
    The fused layout's group-wide nodes (shared norm, wide q/k/v and its Split, Concat and wide down)
    are `/g{group}/{role}/...` with the group's layers and no branch, as in the portable fused layout.
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
        elif part in GROUP_ROLES:
            index = group_of[layer][0]
            meta = {GROUP: str(index), LAYER: ",".join(map(str, plan.groups[index])), ROLE: GROUP_ROLES[part]}
            node.name = f"/g{index}/{GROUP_ROLES[part]}/{rest}"
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
