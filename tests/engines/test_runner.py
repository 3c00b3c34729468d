"""engines/runner.py through the TensorRT runner: with Polygraphy's TrtRunner faked (TensorRT is absent),
TensorRTRunner rejects the same bad calls as OrtRunner with the same one-line errors, before the engine
sees a feed, and passes good feeds and outputs through unchanged.

The fake TrtRunner has TrtRunner's interface (activate, set_profile, infer, deactivate) over an ONNX
Runtime session of the tiny export, and reuses its output buffers between calls as TrtRunner does.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import onnxruntime as ort
import polygraphy.backend.trt as polygraphy_trt
import pytest
import torch
from cqil.engines.onnxruntime import OrtRunner
from cqil.engines.runner import ContractRunner
from cqil.engines.tensorrt.runner import TensorRTRunner
from cqil.export.contract import read_contract
from cqil.model.errors import CqilError
from polygraphy.exception import PolygraphyException

from tests.engines.test_onnxruntime import BAD_CALLS, tokens


class FakeTrtRunner:
    """TrtRunner's calls, answered by ONNX Runtime; records profiles and feeds."""

    fail_activation = False

    def __init__(self, engine_loader):
        self.engine_loader, self.profiles, self.feeds = engine_loader, [], []
        self.returned: list[np.ndarray] = []

    def activate(self):
        if self.fail_activation:
            raise PolygraphyException("Failed to deserialize the engine\nsecond line")
        self.session = ort.InferenceSession(self.engine_loader.onnx, providers=["CPUExecutionProvider"])

    def set_profile(self, index):
        self.profiles.append(index)

    def infer(self, feed_dict):
        for array in self.returned:  # TrtRunner reuses its host buffers: earlier outputs change
            array.fill(np.nan)
        self.feeds.append(feed_dict)
        names = [value.name for value in self.session.get_outputs()]
        self.returned = self.session.run(names, feed_dict)
        return dict(zip(names, self.returned))

    def deactivate(self):
        pass


@pytest.fixture
def fake_polygraphy(monkeypatch, tiny_cqil_onnx):
    """TensorRT 'installed' (a stand-in module) and Polygraphy's TrtRunner / EngineFromPath faked."""
    onnx = str(tiny_cqil_onnx[1] / "model.onnx")
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(polygraphy_trt, "EngineFromPath", lambda path: types.SimpleNamespace(path=path, onnx=onnx))
    monkeypatch.setattr(polygraphy_trt, "TrtRunner", FakeTrtRunner)


@pytest.fixture
def trt_runner(fake_polygraphy, tiny_cqil_onnx, tmp_path):
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"engine bytes")
    return TensorRTRunner(engine, read_contract(tiny_cqil_onnx[1] / "model.onnx"))


@pytest.fixture(scope="module")
def ort_runner(tiny_cqil_onnx):
    return OrtRunner(tiny_cqil_onnx[1], threads=1)


@pytest.mark.parametrize("call, message", BAD_CALLS)
def test_tensorrt_rejects_bad_calls_as_onnxruntime_does(trt_runner, ort_runner, call, message):
    errors = []
    for runner in (ort_runner, trt_runner):
        with pytest.raises(CqilError) as info:
            call(runner)
        errors.append(str(info.value))
    assert errors[0] == errors[1] and message in errors[1] and "\n" not in errors[1]
    assert trt_runner.runner.feeds == []  # refused before the engine saw a feed


@torch.no_grad()
def test_tensorrt_runner_passes_feeds_and_outputs_through(trt_runner, ort_runner):
    ids = tokens(2, 8, seed=3)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :3] = 0
    logits, past = trt_runner(ids[:, :6], mask)
    want_logits, want_past = ort_runner(ids[:, :6], mask)
    first = logits.clone()
    steps = []
    for step in (6, 7):
        mask = torch.cat((mask, torch.ones(2, 1, dtype=torch.long)), 1)
        steps.append((trt_runner(ids[:, step:step + 1], mask, past_key_values=past),
                      ort_runner(ids[:, step:step + 1], mask, past_key_values=want_past)))
        past, want_past = steps[-1][0][1], steps[-1][1][1]
    assert trt_runner.runner.profiles == [0, 1]  # prefill profile, then decode, switched once
    assert torch.equal(logits, first) and torch.equal(logits, want_logits)  # not overwritten by later calls
    for (got_logits, got_past), (ref_logits, ref_past) in steps:
        assert torch.equal(got_logits, ref_logits)
        assert all(torch.equal(a, b) for a, b in zip(got_past, ref_past))
    prefill = trt_runner.runner.feeds[0]
    assert prefill["past_key_values.3.value"].shape == (2, 2, 0, 16)
    assert prefill["input_ids"].dtype == np.int64 and prefill["past_key_values.0.key"].dtype == np.float32


def test_tensorrt_runner_setup_errors(fake_polygraphy, tiny_cqil_onnx, tmp_path, monkeypatch):
    spec = read_contract(tiny_cqil_onnx[1] / "model.onnx")
    with pytest.raises(CqilError, match="engine '.*nowhere.plan' does not exist"):
        TensorRTRunner(tmp_path / "nowhere.plan", spec)
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"stale")
    monkeypatch.setattr(FakeTrtRunner, "fail_activation", True)
    with pytest.raises(CqilError, match="did not load as a TensorRT engine .*Failed to deserialize") as info:
        TensorRTRunner(engine, spec)
    assert "\n" not in str(info.value)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(CqilError, match="TensorRT is not installed here"):
        TensorRTRunner(engine, spec)


def test_unsupported_cache_type_is_refused_with_the_file_named(tiny_cqil_onnx):
    import dataclasses

    spec = dataclasses.replace(read_contract(tiny_cqil_onnx[1] / "model.onnx"), kv_dtype="BFLOAT16")
    with pytest.raises(CqilError, match="'some.onnx': cache element type BFLOAT16 is not supported"):
        ContractRunner("some.onnx", spec)
