"""ONNX export (DESIGN.md section 4) on tiny random models of each family, run with ONNX Runtime (CPU).

The reference is always the PyTorch CqilModel of the same checkpoint and plan, computed independently
of the exported graph. Exports take ~10 s each, so each configuration is exported once per module.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from cqil.engines.triton import has_tokenizer
from cqil.export import contract
from cqil.export.check import check_branch_structure
from cqil.export.last_logits import SLICE_NAME, keep_last_position_logits
from cqil.export.precision import DEFAULT_QUANTIZATION
from cqil.model.cqil import CqilModel
from cqil.model.errors import CqilError
from cqil.model.plan import Plan
from cqil.model.steps import greedy_generate
from cqil.pipeline.cli import main

from tests.helpers import tiny_model
from tests.ort_runner import greedy, run, session

TOL = 1e-4
# family -> (layers, plan options, plan); mistral gets a short sliding window that decoding crosses.
CASES = {
    "llama": (4, ["--groups", "1-3", "--bypass", "2"], Plan(((0,), (1, 2, 3)), 2)),
    "mistral": (3, ["--groups", "1-2", "--bypass", "1"], Plan(((0,), (1, 2)), 1)),
    "qwen2": (3, ["--uniform", "0:3:2"], Plan(((0, 1), (2,)), 0)),
}
OVERRIDES = {"mistral": {"sliding_window": 5}}
# "mistral-nowindow": the mistral case without a sliding window, which --target onnxruntime refuses.


def base_family(family: str) -> str:
    return family.split("-")[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """Factory: a saved tiny checkpoint per family, with non-trivial norm scales and varied outputs."""
    made: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in made:
            model = tiny_model(base_family(family), CASES[base_family(family)][0], **OVERRIDES.get(family, {}))
            generator = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "norm" in name:
                        param.copy_(0.8 + 0.4 * torch.rand(param.shape, generator=generator))
                    else:
                        param.copy_(0.2 * torch.randn(param.shape, generator=generator))
            path = tmp_path_factory.mktemp(f"export-{family}")
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            made[family] = path
        return made[family]

    return make


@pytest.fixture(scope="module")
def exported(tmp_path_factory, model_dir):
    """Factory: `cqil export` of a family's checkpoint with extra options, once per module."""
    made: dict[tuple, Path] = {}

    def make(family: str, *options: str, name: str = "") -> Path:
        key = (family, options, name)
        if key not in made:
            out = tmp_path_factory.mktemp("onnx") / "onnx"
            argv = ["export", "--model", str(model_dir(family)), *CASES[base_family(family)][1], "--out", str(out),
                    *options]
            assert main(argv) == 0
            made[key] = out
        return made[key]

    return make


@pytest.fixture(scope="module")
def reference(model_dir):
    """Factory: the PyTorch CqilModel of a family's checkpoint, under its plan."""
    from transformers import AutoModelForCausalLM

    def make(family: str, dtype=torch.float32) -> CqilModel:
        hf = AutoModelForCausalLM.from_pretrained(model_dir(family), dtype=dtype).eval()
        return CqilModel(hf, CASES[family][2])

    return make


def batch(seq: int = 6, pad: tuple[int, ...] = (0, 0), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts; row r left-padded with pad[r] pad tokens (id 2)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (len(pad), seq), generator=generator)
    mask = torch.ones(len(pad), seq, dtype=torch.long)
    for row, count in enumerate(pad):
        ids[row, :count] = 2
        mask[row, :count] = 0
    return ids, mask


def max_diff(ort_out, torch_out) -> float:
    return float(np.abs(np.asarray(ort_out, np.float32) - torch_out.float().numpy()).max())


def assert_close(ort_logits, ort_presents, torch_logits, torch_presents, tol=TOL):
    assert max_diff(ort_logits, torch_logits) <= tol
    assert len(ort_presents) == len(torch_presents)
    assert max(max_diff(o, t) for o, t in zip(ort_presents, torch_presents)) <= tol


# -- parity with PyTorch -----------------------------------------------------------------------------

@pytest.mark.parametrize("family", CASES)
def test_contract_names_and_dynamic_dims(family, exported, reference):
    sess = session(exported(family) / "model.onnx")
    model = reference(family)
    layers = model.num_layers
    assert [i.name for i in sess.get_inputs()] == contract.input_names(layers)
    assert [o.name for o in sess.get_outputs()] == contract.output_names(layers)
    shapes = {i.name: i.shape for i in [*sess.get_inputs(), *sess.get_outputs()]}
    kv, dim = model.num_kv_heads, model.head_dim
    assert shapes["input_ids"] == ["batch", "seq"]
    assert shapes["attention_mask"] == ["batch", "total"]
    assert shapes["position_ids"] == ["batch", "seq"]
    assert shapes["past_key_values.0.key"] == ["batch", kv, "past", dim]
    assert shapes["logits"] == ["batch", "seq", model.hf.config.vocab_size]
    assert shapes[f"present.{layers - 1}.value"] == ["batch", kv, "total", dim]


@pytest.mark.parametrize("family", CASES)
def test_prefill_matches_pytorch(family, exported, reference):
    ids, mask = batch(seq=7, pad=(0, 0, 0))
    logits, presents = run(session(exported(family) / "model.onnx"), ids, mask)
    with torch.no_grad():
        expected, expected_presents = reference(family)(ids, mask)
    assert_close(logits, presents, expected, expected_presents)


@pytest.mark.parametrize("family", CASES)
def test_decode_with_past_matches_pytorch(family, exported, reference):
    model = reference(family)
    ids, mask = batch(seq=5)
    with torch.no_grad():
        _, past = model(ids, mask)
        step = torch.tensor([[17], [230]])
        mask = torch.cat((mask, torch.ones(2, 1, dtype=torch.long)), 1)
        expected, expected_presents = model(step, mask, past_key_values=past)
    logits, presents = run(session(exported(family) / "model.onnx"), step, mask, [p.numpy() for p in past])
    assert logits.shape == (2, 1, model.hf.config.vocab_size)
    assert_close(logits, presents, expected, expected_presents)


@pytest.mark.parametrize("family", CASES)
def test_left_padded_batch(family, exported, reference):
    """ORT equals PyTorch on a left-padded batch, and each padded row equals that prompt run alone."""
    sess = session(exported(family) / "model.onnx")
    ids, mask = batch(seq=8, pad=(3, 0, 1))
    logits, presents = run(sess, ids, mask)
    with torch.no_grad():
        expected, expected_presents = reference(family)(ids, mask)
    assert_close(logits, presents, expected, expected_presents)
    for row, pad in enumerate((3, 0, 1)):
        alone, _ = run(sess, ids[row:row + 1, pad:], mask[row:row + 1, pad:])
        assert np.abs(logits[row, pad:] - alone[0]).max() <= TOL


@pytest.mark.parametrize("family", CASES)
def test_prefill_then_decode_steps_with_ort_presents(family, exported, reference):
    """A chained prefill and 5 decode steps, ORT fed with its own presents, PyTorch with its own."""
    sess = session(exported(family) / "model.onnx")
    model = reference(family)
    ids, mask = batch(seq=6, pad=(2, 0))
    logits, past = run(sess, ids, mask)
    with torch.no_grad():
        expected, expected_past = model(ids, mask)
        for step in range(5):
            token = torch.tensor([[40 + step], [90 + 7 * step]])
            mask = torch.cat((mask, torch.ones(2, 1, dtype=torch.long)), 1)
            logits, past = run(sess, token, mask, past)
            expected, expected_past = model(token, mask, past_key_values=expected_past)
            assert_close(logits, past, expected, expected_past)
    assert past[0].shape[2] == 11  # the window of mistral (5) is crossed


@pytest.mark.parametrize("family", CASES)
def test_greedy_generation_same_tokens(family, exported, reference):
    ids, mask = batch(seq=6, pad=(2, 0), seed=3)
    tokens = greedy(session(exported(family) / "model.onnx"), ids, mask, 12)
    expected = greedy_generate(reference(family), ids, mask, 12)
    assert tokens.tolist() == expected.tolist()
    assert len(set(tokens.flatten().tolist())) > 4  # a real sequence, not one repeated token


# -- names, metadata, folder -------------------------------------------------------------------------

def test_node_names_and_metadata_identify_group_branch_layer_role(exported):
    model = onnx.load(exported("llama") / "model.onnx")
    names = {node.name for node in model.graph.node}
    for layer in (1, 2, 3):
        for part in ("attn_norm/Pow", "attn/q_proj/MatMul", "attn/Softmax", "residual/Add",
                     "ffn_norm/Pow", "ffn/gate_proj/MatMul", "ffn/down_proj/MatMul"):
            assert f"/g1/l{layer}/{part}" in names
    assert "/g1/l2/bypass/Add" in names and "/g1/l3/bypass/Add" in names
    assert not any(name.startswith("/g1/l1/bypass") for name in names)  # the first layer has no bypass
    assert "/g1/combine/Add" in names and "/g0/l0/attn/o_proj/MatMul" in names
    q_proj = next(node for node in model.graph.node if node.name == "/g1/l3/attn/q_proj/MatMul")
    meta = {p.key: p.value for p in q_proj.metadata_props}
    assert (meta["cqil.group"], meta["cqil.branch"], meta["cqil.layer"], meta["cqil.role"]) == ("1", "2", "3", "attn")
    assert not any("stack_trace" in p.key for node in model.graph.node for p in node.metadata_props)


def test_folder_is_self_describing(exported, model_dir, tokenizer):
    from cqil.model.version import __version__
    from transformers import AutoConfig, AutoTokenizer

    folder = exported("llama")
    meta = {p.key: p.value for p in onnx.load(folder / "model.onnx").metadata_props}
    plan = json.loads(meta[contract.PLAN_KEY])
    assert plan["groups"] == [[0], [1, 2, 3]] and plan["bypass"] == 2
    assert meta[contract.LAYOUT_KEY] == "branches" and meta[contract.DTYPE_KEY] == "fp32"
    assert "path" not in json.loads(meta[contract.SOURCE_KEY])  # the path is beside the ONNX, not in its bytes
    assert contract.read_contract(folder / "model.onnx").source_model()["path"] == str(model_dir("llama"))
    assert meta[contract.VERSION_KEY] == f"cqil-pipeline {__version__}"
    assert json.loads(meta[contract.KV_SHAPE_KEY]) == {"layers": 4, "kv_heads": 2, "head_dim": 16}
    config = AutoConfig.from_pretrained(folder)
    assert config.cqil_plan["groups"] == [[0], [1, 2, 3]]
    assert (folder / "generation_config.json").is_file()
    text = "def f(x): return x"
    assert AutoTokenizer.from_pretrained(folder)(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert sorted(p.name for p in folder.parent.iterdir()) == ["onnx"]  # no temporary leftovers


# -- branch structure --------------------------------------------------------------------------------

@pytest.mark.parametrize("family", CASES)
def test_branch_check_passes_on_branch_layout(family, exported):
    report = check_branch_structure(exported(family) / "model.onnx")
    assert report.ok, report.problems
    assert report.branches == CASES[family][0]


def test_branch_check_fails_once_branches_are_merged(exported, reference):
    """Common-subexpression elimination merges the RMSNorm statistics of a group's branches."""
    import onnx_ir as ir
    from onnx_ir.passes.common import CommonSubexpressionEliminationPass

    model = ir.load(exported("llama") / "model.onnx")
    CommonSubexpressionEliminationPass()(model)
    merged = ir.serde.serialize_model(model)
    report = check_branch_structure(merged)
    assert not report.ok
    assert any("branches merged" in problem and "attn_norm" in problem for problem in report.problems)
    # The math is unchanged: the merged graph still computes the CQIL model, only not as branches.
    ids, mask = batch()
    logits, _ = run(session(merged.SerializeToString()), ids, mask)
    with torch.no_grad():
        assert max_diff(logits, reference("llama")(ids, mask)[0]) <= TOL


def test_branch_check_rejects_fused_layout(exported):
    report = check_branch_structure(exported("llama", "--layout", "fused") / "model.onnx")
    assert not report.ok and "fused" in report.problems[0]


# -- fused layout, fp16, bytes ------------------------------------------------------------------------

def test_fused_layout_equals_branch_layout(exported):
    branches = exported("llama")
    fused = exported("llama", "--layout", "fused")
    ids, mask = batch(seq=7, pad=(2, 0))
    wide, narrow = session(fused / "model.onnx"), session(branches / "model.onnx")
    logits_f, past_f = run(wide, ids, mask)
    logits_b, past_b = run(narrow, ids, mask)
    assert_close(logits_f, past_f, torch.from_numpy(logits_b), [torch.from_numpy(p) for p in past_b])
    mask = torch.cat((mask, torch.ones(2, 1, dtype=torch.long)), 1)
    step = torch.tensor([[5], [6]])
    logits_f, past_f = run(wide, step, mask, past_f)
    logits_b, past_b = run(narrow, step, mask, past_b)
    assert_close(logits_f, past_f, torch.from_numpy(logits_b), [torch.from_numpy(p) for p in past_b])

    def group_matmuls(folder):
        graph = onnx.load(folder / "model.onnx").graph
        return sum(node.op_type == "MatMul" and node.name.startswith("/g1/") for node in graph.node)

    # branches: 3 layers x (q, k, v, o, gate, up, down and the 2 attention products);
    # fused (packed pieces): one each of q/k/v and the 2 attention products for the 3 layers, then per layer
    # o, gate, up and down (the FFN runs per layer on ONNX Runtime CPU: docs/export.md says why).
    assert group_matmuls(branches) == 27
    assert group_matmuls(fused) == 15


@pytest.mark.parametrize("layout", ["branches", "fused"])
def test_attention_reads_each_kv_head_once(layout, exported):
    """GQA without repeating the cache: the attention products read the appended cache [b, kv_heads, T, d]
    itself (the key only transposed), and no Expand or Tile copies it out to the query heads.

    The repeated copy, built every step over every cached position, was a third of a batched decode
    step on ONNX Runtime CPU (docs/serving.md)."""
    folder = exported("llama", *(("--layout", "fused") if layout == "fused" else ()))  # branches: the default
    config = json.loads((folder / "config.json").read_text())
    assert config["num_attention_heads"] > config["num_key_value_heads"]  # the tiny model is GQA
    graph = onnx.load(folder / "model.onnx").graph
    producer = {out: node for node in graph.node for out in node.output}
    role = {node.name: {p.key: p.value for p in node.metadata_props}.get("cqil.role") for node in graph.node}
    attention = [node for node in graph.node if role[node.name] == "attn"]
    assert [node.name for node in attention if node.op_type in ("Expand", "Tile")] == []

    def is_cache(name: str) -> bool:
        """A Concat of past and new along the time axis: the cache as the layer presents it."""
        node = producer[name]
        return node.op_type == "Concat" and attributes(node)["axis"] in (2, -2)

    weights = {tensor.name for tensor in graph.initializer}
    products = [node for node in attention if node.op_type == "MatMul" and node.input[1] not in weights]
    # scores and values: per layer (4), or per group (2) with the group's layers packed on the head axis
    assert len(products) == {"branches": 8, "fused": 4}[layout]
    for node in products:
        source = producer[node.input[1]]
        if source.op_type == "Transpose":
            assert attributes(source)["perm"] == [0, 1, 3, 2] and is_cache(source.input[0]), node.name
        else:
            assert is_cache(node.input[1]), node.name


def test_fp16_export_runs_with_external_data(exported, reference):
    folder = exported("llama", "--precision", "fp16", "--external-data")
    # the graph file holds no weights, the data file all of them
    assert (folder / "model.onnx").stat().st_size < (folder / "model.onnx.data").stat().st_size
    sess = session(folder / "model.onnx")
    assert sess.get_inputs()[3].type == "tensor(float16)"
    ids, mask = batch(seq=7, pad=(2, 0))
    logits, presents = run(sess, ids, mask)
    assert logits.dtype == np.float16 and presents[0].dtype == np.float16
    with torch.no_grad():
        expected = reference("llama", torch.float16)(ids, mask)[0].float().numpy()
    real = mask.bool().numpy()
    logits = logits.astype(np.float32)
    assert np.abs(logits - expected)[real].max() <= 1e-2 * np.abs(expected).max()
    assert (logits.argmax(-1) == expected.argmax(-1))[real].all()
    assert check_branch_structure(folder / "model.onnx").ok


def test_original_model_export_equals_transformers(tiny_model_dir, tmp_path):
    """`--original` (the reference for cqil bench) computes what HF's own forward computes."""
    from transformers import AutoModelForCausalLM

    source = tiny_model_dir("qwen2", 2)
    out = tmp_path / "onnx"
    assert main(["export", "--model", str(source), "--original", "--out", str(out)]) == 0
    ids, mask = batch(seq=7, pad=(2, 0))
    logits, _ = run(session(out / "model.onnx"), ids, mask)
    hf = AutoModelForCausalLM.from_pretrained(source).eval()
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        expected = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool().numpy()
    assert np.abs(logits - expected.numpy())[real].max() <= TOL
    report = check_branch_structure(out / "model.onnx")
    assert report.ok and report.groups == report.branches == 2


# -- int8 / int4 weights (MatMulNBits) --------------------------------------------------------------

def constant_weight_matmuls(graph) -> set[str]:
    """The MatMuls of an fp32 graph whose weight is an initializer, or a Transpose of one (tied logits)."""
    initializers = {init.name for init in graph.initializer}
    transposed = {node.output[0] for node in graph.node if node.op_type == "Transpose" and node.input[0] in initializers}
    return {node.name for node in graph.node
            if node.op_type == "MatMul" and (node.input[1] in initializers or node.input[1] in transposed)}


def attributes(node) -> dict:
    return {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}


QUANTIZED = [("int4", "branches"), ("int4", "fused"), ("int8", "branches")]
# The export options of a layout: branches is the default, so its fp32 export is the module's first one.
LAYOUT_OPTIONS = {"branches": (), "fused": ("--layout", "fused")}


@pytest.mark.parametrize(("precision", "layout"), QUANTIZED)
def test_quantized_export_has_every_weight_matmul_as_matmulnbits(precision, layout, exported):
    """Default settings: int8 all 8-bit symmetric; int4 the DEFAULT_QUANTIZATION method in 4 bits (HQQ: a zero
    point per block) except the matmuls it names, 8-bit; every node at accuracy level 4, the recipe recorded."""
    fp32 = onnx.load(str(exported("llama", *LAYOUT_OPTIONS[layout]) / "model.onnx")).graph
    folder = exported("llama", *LAYOUT_OPTIONS[layout], "--precision", precision)
    graph = onnx.load(str(folder / "model.onnx")).graph
    expected = constant_weight_matmuls(fp32)
    nodes = {node.name: node for node in graph.node if node.op_type == "MatMulNBits"}
    assert len(nodes) == len(expected) and "/lm_head/MatMul" in expected
    assert not constant_weight_matmuls(graph)  # only the attention products stay MatMul
    kept = DEFAULT_QUANTIZATION.int8_matmuls if precision == "int4" else ()
    assert "lm_head" in kept or precision == "int8"
    for name, node in nodes.items():
        attrs = attributes(node)
        eight = precision == "int8" or any(f"/{matmul}/" in name for matmul in kept)
        assert attrs["block_size"] == 32 and attrs["accuracy_level"] == 4
        assert attrs["bits"] == (8 if eight else 4), name
        asymmetric = not eight and DEFAULT_QUANTIZATION.method == "hqq"
        assert (len(node.input) == 4) == asymmetric, name  # HQQ's zero points; RTN and 8-bit are symmetric
    if precision == "int4" and layout == "branches":  # every named projection of a layer is there to match
        assert {name.split("/")[-2] for name, node in nodes.items() if attributes(node)["bits"] == 8} == set(kept)
    meta = {prop.key: prop.value for prop in onnx.load(str(folder / "model.onnx"), load_external_data=False).metadata_props}
    assert meta[contract.PRECISION_KEY] == precision and meta[contract.DTYPE_KEY] == "fp32"
    assert json.loads(meta[contract.QUANTIZATION_KEY])["method"] == DEFAULT_QUANTIZATION.method
    if layout == "branches":
        assert check_branch_structure(folder / "model.onnx").ok


def test_int4_settings_choose_the_method_and_the_8_bit_matmuls(exported):
    """`--int4-method rtn --int8-matmuls lm_head` is the GenAI model builder's recipe: symmetric 4-bit, only the
    logits layer 8-bit; `--accuracy-level 0` leaves the attribute out (fp32 activations)."""
    folder = exported("llama", "--precision", "int4", "--int4-method", "rtn", "--int8-matmuls", "lm_head",
                      "--accuracy-level", "0")
    graph = onnx.load(str(folder / "model.onnx")).graph
    nodes = [node for node in graph.node if node.op_type == "MatMulNBits"]
    assert {(node.name, attributes(node)["bits"]) for node in nodes if attributes(node)["bits"] == 8} == \
        {("/lm_head/MatMul_Q8", 8)}
    assert all(len(node.input) == 3 and "accuracy_level" not in attributes(node) for node in nodes)
    meta = {prop.key: prop.value for prop in onnx.load(str(folder / "model.onnx"), load_external_data=False).metadata_props}
    assert json.loads(meta[contract.QUANTIZATION_KEY]) == {"method": "rtn", "block_size": 32, "accuracy_level": 0,
                                                          "int8_matmuls": ["lm_head"]}


def logit_agreement(folder: Path, model: CqilModel) -> tuple[float, float]:
    """Mean KL(PyTorch fp32 || ONNX) and top-1 agreement over a prefill and 4 decode steps on the file's own cache."""
    from cqil.model.divergence import Agreement

    agreement = Agreement()
    sess = session(folder / "model.onnx")
    ids, mask = batch(seq=12, pad=(0, 3))
    with torch.no_grad():
        expected, expected_past = model(ids[:, :8], mask[:, :8])
        logits, past = run(sess, ids[:, :8], mask[:, :8])
        pairs = [(expected[:, 3:], torch.from_numpy(logits)[:, 3:])]
        for step in range(8, 12):
            expected, expected_past = model(ids[:, step:step + 1], mask[:, :step + 1], past_key_values=expected_past)
            logits, past = run(sess, ids[:, step:step + 1], mask[:, :step + 1], past)
            pairs.append((expected, torch.from_numpy(logits)))
    for reference, actual in pairs:
        agreement.add(torch.log_softmax(reference.double(), -1), torch.log_softmax(actual.double(), -1))
    return agreement.kl, agreement.top1


def test_quantized_logits_track_fp32_int8_closer_than_int4(exported, reference):
    model = reference("llama")
    kl4, top4 = logit_agreement(exported("llama", "--layout", "fused", "--precision", "int4"), model)
    kl8, top8 = logit_agreement(exported("llama", "--precision", "int8"), model)
    kl32, top32 = logit_agreement(exported("llama"), model)
    measured = {"int4": (kl4, top4), "int8": (kl8, top8), "fp32": (kl32, top32)}
    # The tiny model's weights are N(0, 0.2) with small logit margins: 4-bit blocks add ~9 % noise to every
    # matmul (measured KL ~0.3 here); the real model's figures are cqil validate's (docs/export.md).
    assert kl32 < 1e-6 and top32 == 1.0, measured
    assert kl8 < 0.01 and top8 >= 0.95, measured
    assert kl8 < kl4 < 0.6, measured  # 8-bit blocks are ~16x finer than 4-bit ones


def test_int4_folder_runs_in_genai_as_in_onnxruntime(exported):
    """GenAI's Generator on the int4 folder picks the greedy tokens of a plain ORT session on the same file."""
    from cqil.engines.genai import GenaiModel

    folder = exported("llama", "--layout", "fused", "--precision", "int4")
    ids, mask = batch(seq=6, pad=(0,))
    expected = greedy(session(folder / "model.onnx"), ids, mask, 8)[0].tolist()
    eos = 2  # the tiny config's: the Generator stops there
    expected = expected[:expected.index(eos) + 1] if eos in expected else expected
    assert GenaiModel(folder, threads=1).greedy([ids[0].tolist()], 8)[0] == expected



# -- the served graph: last-position logits (export/last_logits.py) ---------------------------------

@pytest.mark.parametrize("options", [(), ("--layout", "fused", "--precision", "int4")], ids=["fp32", "int4-fused"])
def test_last_position_logits_are_the_contract_graphs_last_logits(options, exported):
    """The served graph returns, for a left-padded prefill and a decode step after it, the last row of the
    contract graph's logits and the same presents; nothing else in the graph changes."""
    model = onnx.load(str(exported("llama", *options) / "model.onnx"))
    served = keep_last_position_logits(model)
    assert [n.op_type for n in served.graph.node if n.op_type == "Slice" and n.name == SLICE_NAME] == ["Slice"]
    assert len(served.graph.node) == len(model.graph.node) + 1
    full, last = session(model.SerializeToString()), session(served.SerializeToString())
    ids, mask = batch(seq=7, pad=(0, 3))
    expected, expected_presents = run(full, ids, mask)
    logits, presents = run(last, ids, mask)
    assert logits.shape == (2, 1, expected.shape[-1])
    np.testing.assert_allclose(logits[:, 0], expected[:, -1], rtol=1e-5, atol=1e-5)
    for got, want in zip(presents, expected_presents, strict=True):
        np.testing.assert_array_equal(got, want)
    step, mask = torch.tensor([[11], [12]]), torch.cat((mask, torch.ones(2, 1, dtype=torch.long)), 1)
    np.testing.assert_allclose(run(last, step, mask, presents)[0], run(full, step, mask, expected_presents)[0],
                               rtol=1e-5, atol=1e-5)


def test_last_position_logits_refuse_a_graph_without_an_output_layer():
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["logits"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", 4])])
    with pytest.raises(CqilError, match="comes from Identity"):
        keep_last_position_logits(helper.make_model(graph))


# -- --target onnxruntime: the model builder's graph with the CQIL groups ---------------------------

def named_run(sess, ids: torch.Tensor, past: dict[str, np.ndarray] | None, total: int, cache_dtype=np.float32):
    """One step of a file fed by input names (the builder's graph takes no position_ids): logits, presents by past name."""
    names = {spec.name for spec in sess.get_inputs()}
    if past is None:
        spec = next(s for s in sess.get_inputs() if s.name.startswith("past_key_values."))
        empty = np.zeros((ids.shape[0], spec.shape[1], 0, spec.shape[3]), cache_dtype)
        past = {name: empty for name in names if name.startswith("past_key_values.")}
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((ids.shape[0], total), np.int64), **past}
    if "position_ids" in names:
        feeds["position_ids"] = np.arange(total - ids.shape[1], total)[None].repeat(ids.shape[0], 0)
    outputs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    presents = {name.replace("present.", "past_key_values."): value for name, value in outputs.items()
                if name.startswith("present.")}
    return outputs["logits"], presents


def op_counts(folder: Path) -> dict[str, int]:
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def assert_matches_portable(portable_folder: Path, folder: Path) -> None:
    """fp32: `folder` and the portable export agree to 1e-4 on a prefill and 3 decode steps, each on its own cache."""
    portable, fused_ops = session(portable_folder / "model.onnx"), session(folder / "model.onnx")
    ids = batch(seq=10, pad=(0,))[0]
    expected, expected_past = named_run(portable, ids[:, :7], None, 7)
    logits, past = named_run(fused_ops, ids[:, :7], None, 7)
    assert np.abs(logits - expected).max() <= TOL
    assert max(np.abs(past[name] - expected_past[name]).max() for name in expected_past) <= TOL
    for step in range(7, 10):
        expected, expected_past = named_run(portable, ids[:, step:step + 1], expected_past, step + 1)
        logits, past = named_run(fused_ops, ids[:, step:step + 1], past, step + 1)
        assert np.abs(logits - expected).max() <= TOL, step
        assert max(np.abs(past[name] - expected_past[name]).max() for name in expected_past) <= TOL


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # mistral's sliding window is refused (test_export_errors)
def test_onnxruntime_target_equals_portable_on_prefill_and_decode(family, exported):
    assert_matches_portable(exported(family), exported(family, "--target", "onnxruntime"))


def test_triton_refuses_an_onnxruntime_target_export_for_its_text_model(exported, tmp_path, capsys):
    """Its GroupQueryAttention reads a right-padded cache; the text model batches left-padded rows."""
    folder = exported("llama", "--target", "onnxruntime")
    assert has_tokenizer(folder)
    capsys.readouterr()  # the export's own progress
    code = main(["triton", "--onnx", str(folder), "--out", str(tmp_path / "repo")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--target onnxruntime export" in err and "--target portable" in err
    assert not (tmp_path / "repo").exists()


def test_onnxruntime_target_uses_the_fused_operators_and_keeps_branches(exported):
    folder = exported("llama", "--target", "onnxruntime")
    layers, groups = 4, CASES["llama"][2].groups
    counts = op_counts(folder)
    assert counts["GroupQueryAttention"] == layers  # rotary embedding and the KV cache inside
    grouped = [layer for group in groups if len(group) > 1 for layer in group]
    # layer 0's input norm (no residual yet) and each grouped layer's (on the shared group input) are plain;
    # every other norm fuses the residual add: 2 per layer and the final one, less those
    assert counts["SimplifiedLayerNormalization"] == 1 + len(grouped)
    assert counts["SkipSimplifiedLayerNormalization"] == 2 * layers + 1 - 1 - len(grouped)
    assert counts["MatMul"] == 5 * layers + 1  # q/k/v packed per layer, o, gate, up, down; logits
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    assert all(attributes(node)["do_rotary"] == 1 for node in graph.graph.node if node.op_type == "GroupQueryAttention")
    meta = {prop.key: prop.value for prop in graph.metadata_props}
    assert meta[contract.TARGET_KEY] == "onnxruntime" and json.loads(meta[contract.PLAN_KEY])["bypass"] == 2
    assert check_branch_structure(folder / "model.onnx").ok
    assert json.loads((folder / "genai_config.json").read_text())["search"]["past_present_share_buffer"]


def test_onnxruntime_target_int4_and_genai_generator(exported):
    """int4: every weight MatMul is MatMulNBits (block 32, accuracy level 4, the logits layer 4-bit as in the
    builder's export); GenAI's Generator gives the greedy tokens of the fp32 portable file on this prompt."""
    from cqil.engines.genai import GenaiModel

    folder = exported("llama", "--target", "onnxruntime", "--precision", "int4")
    counts = op_counts(folder)
    assert counts["MatMulNBits"] == 5 * 4 + 1 and "MatMul" not in counts
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    settings = {(attrs["bits"], attrs["block_size"], attrs["accuracy_level"])
                for attrs in (attributes(node) for node in graph.node if node.op_type == "MatMulNBits")}
    assert settings == {(4, 32, 4)}
    assert check_branch_structure(folder / "model.onnx").ok
    fp32 = exported("llama", "--target", "onnxruntime")
    ids, mask = batch(seq=6, pad=(0,))
    expected = greedy(session(exported("llama") / "model.onnx"), ids, mask, 6)[0].tolist()
    eos = 2  # the tiny config's: the Generator stops there
    expected = expected[:expected.index(eos) + 1] if eos in expected else expected
    assert GenaiModel(fp32, threads=1).greedy([ids[0].tolist()], 6)[0] == expected
    assert GenaiModel(folder, threads=1).greedy([ids[0].tolist()], 6)[0]  # the int4 folder runs there too


# -- every target x precision that `cqil export` writes runs where the folder is meant to run --------

# The options each combination is exported with elsewhere in this module (one export each, shared).
RUNNABLE = {
    ("portable", "fp32"): (),
    ("portable", "fp16"): ("--precision", "fp16", "--external-data"),
    ("portable", "int8"): ("--precision", "int8"),
    ("portable", "int4"): ("--precision", "int4"),
    ("onnxruntime", "fp32"): ("--target", "onnxruntime"),
    ("onnxruntime", "int8"): ("--target", "onnxruntime", "--precision", "int8"),
    ("onnxruntime", "int4"): ("--target", "onnxruntime", "--precision", "int4"),
}


def session_greedy(folder: Path, ids: torch.Tensor, steps: int) -> list[int]:
    """Greedy tokens of a plain ORT session on the folder's file, fed by input names (with or without position_ids)."""
    sess = session(folder / "model.onnx")
    half = any(spec.type == "tensor(float16)" for spec in sess.get_inputs() if spec.name.startswith("past_key_values."))
    logits, past = named_run(sess, ids, None, ids.shape[1], np.float16 if half else np.float32)
    tokens = []
    for _ in range(steps):
        tokens.append(int(logits[0, -1].argmax()))
        logits, past = named_run(sess, torch.tensor([[tokens[-1]]]), past, ids.shape[1] + len(tokens))
    return tokens


@pytest.mark.parametrize(("target", "precision"), RUNNABLE)
def test_every_runnable_target_and_precision_runs_in_genai_as_in_onnxruntime(target, precision, exported):
    """The folder loads in GenAI's Generator (genai_config.json) and greedy-decodes as a plain ORT session on the
    same file, and it holds the files Optimum's ORTModelForCausalLM loads (config.json, generation_config.json,
    tokenizer); Optimum itself runs in the slow suite (test_export_slow.py). What no tool runs is refused:
    test_export_errors.py."""
    from cqil.engines.genai import GenaiModel

    folder = exported("llama", *RUNNABLE[(target, precision)])
    ids = batch(seq=6, pad=(0,))[0]
    expected = session_greedy(folder, ids, 6)
    eos = 2  # the tiny config's: the Generator stops there
    expected = expected[:expected.index(eos) + 1] if eos in expected else expected
    assert GenaiModel(folder, threads=1).greedy([ids[0].tolist()], 6)[0] == expected
    for name in ("config.json", "generation_config.json", "genai_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file(), name
    meta = {prop.key: prop.value for prop in onnx.load(str(folder / "model.onnx"), load_external_data=False).metadata_props}
    assert (meta[contract.TARGET_KEY], meta[contract.PRECISION_KEY]) == (target, precision)


@pytest.mark.slow
@pytest.mark.parametrize(("target", "precision"), RUNNABLE)
def test_optimum_runs_every_runnable_target_and_precision(target, precision, exported):
    """scripts/check_optimum.py: Optimum's ORTModelForCausalLM (its own virtualenv) loads the tiny folder and
    greedy-decodes our tokens, at every combination `cqil export` does not refuse."""
    import subprocess
    import sys

    folder = exported("llama", *RUNNABLE[(target, precision)])
    script = Path(__file__).resolve().parents[2] / "scripts" / "check_optimum.py"
    result = subprocess.run([sys.executable, str(script), str(folder), "--max-new-tokens", "6"],
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert "new tokens same" in result.stdout and "DIFFER" not in result.stdout


# -- --target onnxruntime --layout fused: a group's projections as wide operators ---------------------

ORT_FUSED = ("--target", "onnxruntime", "--layout", "fused")


@pytest.mark.parametrize("family", ["llama", "mistral-nowindow", "qwen2"])
def test_onnxruntime_fused_equals_portable_on_prefill_and_decode(family, exported):
    """The wide q/k/v (norm scales folded), per-layer attention, bypass, and the down projections summed by one
    MatMul compute the portable export's logits and caches (llama: a group of 3 with d = 2; mistral: d = 1;
    qwen2: q/k/v biases, d = 0)."""
    assert_matches_portable(exported(family), exported(family, *ORT_FUSED))


def weight_shapes(graph) -> dict[str, list[int]]:
    """MatMul node name -> the dims of its weight initializer."""
    dims = {init.name: list(init.dims) for init in graph.initializer}
    return {node.name: dims[node.input[1]] for node in graph.node if node.op_type.startswith("MatMul")}


def test_onnxruntime_fused_has_one_qkv_and_one_down_matmul_per_group(exported, reference):
    """llama, groups (0), (1, 2, 3): layer 0 is the builder's layer (5 MatMuls); the group has one q/k/v MatMul
    [hidden, 3 (q + 2 kv)], three o, three gate, three up and one down [3 ffn, hidden]; logits: 1."""
    folder = exported("llama", *ORT_FUSED)
    config = reference("llama").hf.config
    hidden, ffn, dim = config.hidden_size, config.intermediate_size, config.hidden_size // config.num_attention_heads
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * dim
    counts = op_counts(folder)
    assert counts["GroupQueryAttention"] == 4  # each layer keeps its own cache
    assert counts["MatMul"] == 5 + (1 + 3 + 3 + 3 + 1) + 1
    assert counts["SimplifiedLayerNormalization"] == 1  # layer 0's input norm: no residual yet
    # layer 0's post-attention norm, the group's shared norm, its 3 post-attention norms, the final norm
    assert counts["SkipSimplifiedLayerNormalization"] == 6
    assert counts["Split"] == 1 and counts["Concat"] == 1
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    shapes = weight_shapes(graph.graph)
    assert shapes["/g1/attn/qkv_proj/MatMul"] == [hidden, 3 * qkv]
    assert shapes["/g1/ffn/down_proj/MatMul"] == [3 * ffn, hidden]
    meta = {prop.key: prop.value for prop in graph.metadata_props}
    assert meta[contract.LAYOUT_KEY] == "fused" and meta[contract.TARGET_KEY] == "onnxruntime"
    assert not check_branch_structure(folder / "model.onnx").ok  # the group's layers share nodes now


def test_onnxruntime_fused_int4_quantizes_every_matmul_and_runs_in_genai(exported):
    """int4: MatMulNBits count = the fp32 fused graph's MatMuls (the wide ones included, constants at export);
    GenAI's Generator on the fp32 fused folder picks the portable file's greedy tokens, and runs the int4 one."""
    from cqil.engines.genai import GenaiModel

    fp32, int4 = exported("llama", *ORT_FUSED), exported("llama", *ORT_FUSED, "--precision", "int4")
    counts = op_counts(int4)
    assert counts["MatMulNBits"] == op_counts(fp32)["MatMul"] and "MatMul" not in counts
    graph = onnx.load(str(int4 / "model.onnx"), load_external_data=False).graph
    wide = [attributes(node) for node in graph.node if node.op_type == "MatMulNBits"
            and node.name.startswith(("/g1/attn/qkv_proj/", "/g1/ffn/down_proj/"))]
    assert len(wide) == 2 and {(attrs["bits"], attrs["block_size"], attrs["accuracy_level"]) for attrs in wide} == {(4, 32, 4)}
    ids, mask = batch(seq=6, pad=(0,))
    expected = greedy(session(exported("llama") / "model.onnx"), ids, mask, 6)[0].tolist()
    eos = 2  # the tiny config's: the Generator stops there
    expected = expected[:expected.index(eos) + 1] if eos in expected else expected
    assert GenaiModel(fp32, threads=1).greedy([ids[0].tolist()], 6)[0] == expected
    assert GenaiModel(int4, threads=1).greedy([ids[0].tolist()], 6)[0]
