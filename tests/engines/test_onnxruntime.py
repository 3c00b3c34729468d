"""engines/onnxruntime.py: OrtRunner equals the PyTorch CqilModel; greedy tokens; bad input; optimized model.

The reference is the PyTorch CqilModel of the exported checkpoint under the same plan, computed
independently of the ONNX graph (one shared tiny export, `tiny_cqil_onnx`).
"""

from __future__ import annotations

import onnx
import pytest
import torch
from cqil.engines.onnxruntime import OrtRunner, create_session
from cqil.model.cqil import CqilModel
from cqil.model.errors import CqilError
from cqil.model.plan import Plan, identity_plan
from cqil.model.steps import HFStep, forced, greedy_generate, prefill_then_decode, timing_calls

TOL = 1e-4
PLAN = Plan(((0,), (1, 2, 3)), 1)


@pytest.fixture(scope="module")
def runner(tiny_cqil_onnx):
    return OrtRunner(tiny_cqil_onnx[1], threads=1)


@pytest.fixture(scope="module")
def reference(tiny_cqil_onnx):
    from transformers import AutoModelForCausalLM

    return CqilModel(AutoModelForCausalLM.from_pretrained(tiny_cqil_onnx[0]).eval(), PLAN)


def tokens(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 384, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_runner_reads_plan_and_providers(runner):
    assert runner.plan.groups == PLAN.groups and runner.plan.bypass == 1
    assert runner.session.get_providers()[-1] == "CPUExecutionProvider"


@torch.no_grad()
def test_prefill_and_decode_equal_pytorch(runner, reference):
    ids = tokens(2, 9)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padding in row 1
    ref_logits, ref_past = reference(ids[:, :6], mask)
    logits, past = runner(ids[:, :6], mask)
    assert logits.shape == ref_logits.shape and len(past) == 8
    assert (logits - ref_logits).abs().max() < TOL
    assert max(float((a - b).abs().max()) for a, b in zip(past, ref_past)) < TOL
    for step in range(6, 9):  # decode, each side on its own cache
        mask = torch.cat((mask, torch.ones(2, 1, dtype=torch.long)), 1)
        ref_logits, ref_past = reference(ids[:, step:step + 1], mask, past_key_values=ref_past)
        logits, past = runner(ids[:, step:step + 1], mask, past_key_values=past)
        assert (logits - ref_logits).abs().max() < TOL
    assert past[0].shape == (2, 2, 9, 16)


def test_greedy_generation_equals_pytorch(runner, reference):
    ids = tokens(2, 5, seed=1)
    mask = torch.ones_like(ids)
    expected = greedy_generate(reference, ids, mask, 6)
    assert torch.equal(greedy_generate(runner, ids, mask, 6), expected)


# Bad calls and the one-line error each gets from ContractRunner (engines/runner.py), before any
# engine runs; tests/engines/test_runner.py holds the TensorRT runner to the same list.
BAD_CALLS = [
    (lambda r: r(tokens(1, 4), torch.ones(1, 5, dtype=torch.long)), "attention_mask has shape (1, 5)"),
    (lambda r: r(tokens(1, 4).float()), "input_ids is torch.float32"),
    (lambda r: r(tokens(1, 4), torch.ones(1, 4)), "attention_mask is torch.float32"),
    (lambda r: r(tokens(1, 4)[0]), "input_ids is torch.int64 (4,)"),
    (lambda r: r(tokens(1, 1), past_key_values=[torch.zeros(1, 2, 3, 16)] * 7), "holds 7 tensors"),
    (lambda r: r(tokens(1, 1), past_key_values=[torch.zeros(1, 2, 3, 8)] * 8), "past_key_values[0] is"),
    (lambda r: r(tokens(1, 1), past_key_values=[torch.zeros(1, 2, 3, 16, dtype=torch.long)] * 8),
     "past_key_values[0] is torch.int64"),
    (lambda r: r(tokens(1, 1), past_key_values=[torch.zeros(1, 2, 3, 16)] * 7 + [torch.zeros(1, 2, 4, 16)]),
     "past_key_values[7] is torch.float32 (1, 2, 4, 16), expected a float tensor [batch, kv_heads, past, head_dim] = "
     + "[1, 2, 3, 16]"),
    (lambda r: r(tokens(1, 1), torch.ones(1, 3, dtype=torch.long), past_key_values=[torch.zeros(1, 2, 3, 16)] * 8),
     "attention_mask has shape (1, 3), expected [batch, past + seq] = [1, 4]"),
    (lambda r: r(tokens(1, 4), None, torch.zeros(1, 3, dtype=torch.long)), "position_ids has shape (1, 3)"),
]


@pytest.mark.parametrize("call, message", BAD_CALLS)
def test_bad_inputs_are_one_line_errors(runner, call, message):
    with pytest.raises(CqilError) as info:
        call(runner)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_and_corrupt_onnx(tmp_path, tiny_cqil_onnx):
    with pytest.raises(CqilError, match="does not exist"):
        OrtRunner(tmp_path / "nowhere")
    (tmp_path / "model.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(CqilError, match="not a readable ONNX model") as info:
        OrtRunner(tmp_path)
    assert "\n" not in str(info.value)
    # A graph that reads but lost a weight: ONNX Runtime refuses it, in one line.
    model = onnx.load(str(tiny_cqil_onnx[1] / "model.onnx"))
    del model.graph.initializer[0]
    broken = tmp_path / "broken"
    broken.mkdir()
    onnx.save(model, str(broken / "model.onnx"))
    with pytest.raises(CqilError, match="ONNX Runtime could not load") as info:
        OrtRunner(broken)
    assert "\n" not in str(info.value)


def test_bad_session_options(tiny_cqil_onnx):
    with pytest.raises(CqilError, match="graph optimization level 'max'"):
        create_session(tiny_cqil_onnx[1] / "model.onnx", opt_level="max")
    with pytest.raises(CqilError, match="NoSuchExecutionProvider not installed"):
        create_session(tiny_cqil_onnx[1] / "model.onnx", providers=["NoSuchExecutionProvider"])


def test_optimized_model_is_written_and_runs_the_same(tmp_path, tiny_cqil_onnx, runner):
    target = tmp_path / "sub" / "optimized.onnx"
    optimized = OrtRunner(tiny_cqil_onnx[1], threads=1, opt_level="basic", optimized_model=target)
    assert target.is_file()
    saved = onnx.load(str(target))
    assert {o.name for o in saved.graph.output} == set(runner.outputs)
    ids = tokens(1, 5, seed=2)
    assert (optimized(ids)[0] - runner(ids)[0]).abs().max() < TOL


def test_spin_off_is_set_in_the_session(tiny_cqil_onnx):
    """cqil bench times several sessions in turn: their pools must not busy-wait after a run."""
    options = create_session(tiny_cqil_onnx[1] / "model.onnx", threads=1, spin=False).get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    default = create_session(tiny_cqil_onnx[1] / "model.onnx", threads=1).get_session_options()
    with pytest.raises(RuntimeError):  # unset: ONNX Runtime's default (spinning) applies
        default.get_session_config_entry("session.intra_op.allow_spinning")


@torch.no_grad()
def test_one_step_harness_drives_onnxruntime_pytorch_and_hf_alike(runner, reference):
    """prefill_then_decode and timing_calls (model/steps.py) give the same logits on every engine."""
    ids = tokens(2, 9, seed=3)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    decoded = ids[:, 6:]
    ort = list(prefill_then_decode(runner, ids[:, :6], mask, forced(decoded)))
    cqil = list(prefill_then_decode(reference, ids[:, :6], mask, forced(decoded)))
    assert len(ort) == len(cqil) == 4
    for (ort_logits, _), (logits, _) in zip(ort, cqil):
        assert (ort_logits - logits).abs().max() < TOL
    # HF's own forward is the original model: CqilModel under the identity plan, on the same weights.
    original = reference.with_plan(identity_plan(4))
    real = mask.bool()
    for index, ((hf_logits, _), (logits, _)) in enumerate(zip(
            prefill_then_decode(HFStep(reference.hf), ids[:, :6], mask, forced(decoded)),
            prefill_then_decode(original, ids[:, :6], mask, forced(decoded)))):
        rows = real if index == 0 else slice(None)  # padded prefill rows attend to nothing
        assert (hf_logits[rows] - logits[rows]).abs().max() < TOL
    # The bound calls a benchmark repeats run the engine on a feed prepared once: same logits as a direct call.
    prefill, decode = timing_calls(runner, ids, past_len=6)
    expected = reference(ids[:, :1], past_key_values=reference(ids[:, :6])[1])[0]
    assert abs(decode()["logits"] - expected.numpy()).max() < TOL
    assert abs(prefill()["logits"] - reference(ids[:, 6:])[0].numpy()).max() < TOL
