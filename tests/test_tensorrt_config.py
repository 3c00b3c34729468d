"""TensorRT build planning without TensorRT: profiles from the ONNX contract, trtexec / build_engine.sh,
and the builder calls, checked against a fake `tensorrt` module injected into sys.modules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from engines import tensorrt as trt_engine
from engines.tensorrt import EngineSettings, ShapeRange
from export.contract import PLAN_KEY
from pipeline.cli import main
from pipeline.model.errors import CqilError
from pipeline.model.plan import Plan

LAYERS, KV_HEADS, HEAD_DIM = 4, 2, 8
PLAN = Plan(((0,), (1, 2, 3)), bypass=1)


def write_contract_onnx(path: Path, plan: Plan | None = PLAN, layers: int = LAYERS, position_ids: bool = True) -> Path:
    """A tiny graph with the contract's inputs and outputs (names, dtypes, dims) and the plan metadata."""
    import onnx
    from onnx import TensorProto, helper

    def value(name, dtype, dims):
        return helper.make_tensor_value_info(name, dtype, dims)

    inputs = [value("input_ids", TensorProto.INT64, ["batch", "seq"]),
              value("attention_mask", TensorProto.INT64, ["batch", "total"])]
    if position_ids:
        inputs.append(value("position_ids", TensorProto.INT64, ["batch", "seq"]))
    outputs = [value("logits", TensorProto.FLOAT, ["batch", "seq", 16])]
    nodes = [helper.make_node("Cast", ["input_ids"], ["ids_float"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["ids_float", "axis"], ["logits"])]
    for i in range(layers):
        for kind in ("key", "value"):
            inputs.append(value(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, ["batch", KV_HEADS, "past", HEAD_DIM]))
            outputs.append(value(f"present.{i}.{kind}", TensorProto.FLOAT, ["batch", KV_HEADS, "total", HEAD_DIM]))
            nodes.append(helper.make_node("Identity", [f"past_key_values.{i}.{kind}"], [f"present.{i}.{kind}"]))
    graph = helper.make_graph(nodes, "contract", inputs, outputs,
                              initializer=[helper.make_tensor("axis", TensorProto.INT64, [1], [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if plan is not None:
        helper.set_model_props(model, {PLAN_KEY: json.dumps(plan.to_dict())})
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def onnx_dir(tmp_path):
    write_contract_onnx(tmp_path / "onnx" / "model.onnx")
    return tmp_path / "onnx"


SETTINGS = EngineSettings(opt_batch=2, max_batch=4, opt_seq=16, max_seq=64, opt_past=100, max_context=256)


def test_profiles_follow_the_contract(onnx_dir, tmp_path):
    plan = trt_engine.plan_build(onnx_dir, tmp_path / "trt" / "model.plan", SETTINGS)
    assert plan.aux_streams == 2  # largest group (3 layers) - 1
    prefill, decode = plan.profiles
    expected_inputs = ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{k}" for i in range(LAYERS) for k in ("key", "value")]
    assert list(prefill) == list(decode) == expected_inputs
    assert prefill["input_ids"] == ShapeRange((1, 1), (2, 16), (4, 64))
    assert prefill["attention_mask"] == ShapeRange((1, 1), (2, 16), (4, 64))
    assert prefill["past_key_values.3.value"] == ShapeRange((1, 2, 0, 8), (2, 2, 0, 8), (4, 2, 0, 8))
    assert decode["input_ids"] == decode["position_ids"] == ShapeRange((1, 1), (2, 1), (4, 1))
    assert decode["attention_mask"] == ShapeRange((1, 2), (2, 101), (4, 256))
    assert decode["past_key_values.0.key"] == ShapeRange((1, 2, 1, 8), (2, 2, 100, 8), (4, 2, 255, 8))


def test_position_ids_optional_and_aux_override(tmp_path):
    path = write_contract_onnx(tmp_path / "m.onnx", plan=None, position_ids=False)
    with pytest.raises(CqilError, match="--aux-streams"):
        trt_engine.plan_build(path, tmp_path / "e.plan", SETTINGS)
    plan = trt_engine.plan_build(path, tmp_path / "e.plan", EngineSettings(aux_streams=0))
    assert plan.aux_streams == 0 and "position_ids" not in plan.profiles[0]


def test_trtexec_command(onnx_dir, tmp_path):
    settings = EngineSettings(precision="fp16", workspace_mib=2048, opt_batch=2, max_batch=4, opt_seq=16,
                              max_seq=64, opt_past=100, max_context=256)
    plan = trt_engine.plan_build(onnx_dir / "model.onnx", tmp_path / "trt" / "model.plan", settings)
    command = trt_engine.build_engine_command(plan, base=onnx_dir)
    assert command[:3] == ["trtexec", "--onnx=model.onnx", "--saveEngine=../trt/model.plan"]
    assert command[3] == "--profile=0"
    mins = command[4]
    assert mins.startswith("--minShapes=input_ids:1x1,attention_mask:1x1,position_ids:1x1,past_key_values.0.key:1x2x0x8,")
    assert command[7] == "--profile=1"
    assert "past_key_values.3.value:4x2x255x8" in command[10] and command[10].startswith("--maxShapes=")
    assert "attention_mask:2x101" in command[9]
    for flag in ("--fp16", "--maxAuxStreams=2", "--memPoolSize=workspace:2048M",
                 "--timingCacheFile=../trt/timing.cache", "--profilingVerbosity=detailed",
                 "--exportLayerInfo=../trt/model.layers.json", "--skipInference"):
        assert flag in command
    assert "--bf16" not in command


def test_build_script_runs_the_same_trtexec_command(onnx_dir, tmp_path):
    """Run build_engine.sh with a stand-in trtexec that records its arguments."""
    plan = trt_engine.plan_build(onnx_dir, tmp_path / "trt" / "model.plan", SETTINGS)
    script = trt_engine.write_build_script(onnx_dir, plan)
    assert script == onnx_dir / "build_engine.sh" and os.access(script, os.X_OK)
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "cqil engine --onnx model.onnx --out ../trt/model.plan" in text
    record = tmp_path / "args.txt"
    fake = tmp_path / "fake-trtexec"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$PWD" "$@" > {record}\n')
    fake.chmod(0o755)
    subprocess.run(["bash", str(script)], check=True, cwd=tmp_path, env={**os.environ, "TRTEXEC": str(fake)})
    cwd, *args = record.read_text().splitlines()
    assert Path(cwd) == onnx_dir.resolve()
    assert args == trt_engine.build_engine_command(plan, base=onnx_dir)[1:]
    assert (tmp_path / "trt").is_dir()  # the script makes the engine's folder


def fake_tensorrt(version: str = "10.3.0", build_ok: bool = True):
    """Just enough of the tensorrt 10 Python API to record what the builder is asked for."""
    calls: dict = {"flags": [], "profiles": [], "pool": {}}
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", BF16="BF16")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.ProfilingVerbosity = types.SimpleNamespace(DETAILED="DETAILED")
    trt.LayerInformationFormat = types.SimpleNamespace(JSON="JSON")
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0)

    class Logger:
        WARNING = "WARNING"

        def __init__(self, severity):
            calls["logger"] = severity

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, min, opt, max):
            self.shapes[name] = (tuple(min), tuple(opt), tuple(max))

    class Cache:
        def __init__(self, data):
            calls["cache_in"] = data

        def serialize(self):
            return b"TIMING"

    class Config:
        max_aux_streams = -1
        profiling_verbosity = None

        def set_flag(self, flag):
            calls["flags"].append(flag)

        def set_memory_pool_limit(self, pool, size):
            calls["pool"][pool] = size

        def create_timing_cache(self, data):
            return Cache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            calls["timing_cache_set"] = (cache, ignore_mismatch)
            self.cache = cache

        def get_timing_cache(self):
            return self.cache

        def add_optimization_profile(self, profile):
            calls["profiles"].append(profile.shapes)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls["network_flags"] = flags
            return "network"

        def create_builder_config(self):
            calls["config"] = Config()
            return calls["config"]

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls["built"] = (network, config)
            return b"PLAN" if build_ok else None

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            assert network == "network"

        def parse_from_file(self, path):
            calls["parsed"] = path
            return True

    class Engine:
        def create_engine_inspector(self):
            return types.SimpleNamespace(get_engine_information=lambda fmt: json.dumps({"Layers": [], "format": fmt}))

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            calls["deserialized"] = data
            return Engine()

    trt.Logger, trt.Builder, trt.OnnxParser, trt.Runtime = Logger, Builder, OnnxParser, Runtime
    return trt, calls


def test_builder_calls_with_fake_tensorrt(onnx_dir, tmp_path):
    settings = EngineSettings(precision="bf16", workspace_mib=512, opt_batch=2, max_batch=4, opt_seq=16,
                              max_seq=64, opt_past=100, max_context=256)
    plan = trt_engine.plan_build(onnx_dir, tmp_path / "trt" / "model.plan", settings)
    trt, calls = fake_tensorrt()
    trt_engine.build_engine(plan, trt)
    config = calls["config"]
    assert calls["network_flags"] == 0  # TensorRT 10: explicit batch is the only mode
    assert calls["parsed"] == str(onnx_dir / "model.onnx")
    assert config.max_aux_streams == 2
    assert calls["flags"] == ["BF16"] and calls["pool"] == {"WORKSPACE": 512 << 20}
    assert config.profiling_verbosity == "DETAILED"
    assert calls["cache_in"] == b"" and calls["timing_cache_set"][1] is False
    assert len(calls["profiles"]) == 2
    prefill, decode = calls["profiles"]
    assert prefill["past_key_values.1.key"] == ((1, 2, 0, 8), (2, 2, 0, 8), (4, 2, 0, 8))
    assert decode["attention_mask"] == ((1, 2), (2, 101), (4, 256))
    assert calls["built"][1] is config
    assert (tmp_path / "trt" / "model.plan").read_bytes() == b"PLAN"
    assert (tmp_path / "trt" / "timing.cache").read_bytes() == b"TIMING"
    assert json.loads((tmp_path / "trt" / "model.layers.json").read_text())["format"] == "JSON"
    # a second build reads the saved timing cache back
    trt2, calls2 = fake_tensorrt()
    trt_engine.build_engine(plan, trt2)
    assert calls2["cache_in"] == b"TIMING"


def test_fake_tensorrt_8_sets_explicit_batch_and_failed_build_writes_nothing(onnx_dir, tmp_path):
    plan = trt_engine.plan_build(onnx_dir, tmp_path / "trt" / "model.plan", SETTINGS)
    trt, calls = fake_tensorrt(version="8.6.1", build_ok=False)
    with pytest.raises(CqilError, match="failed to build"):
        trt_engine.build_engine(plan, trt)
    assert calls["network_flags"] == 1
    assert not (tmp_path / "trt" / "model.plan").exists()


def test_cli_engine_without_tensorrt_writes_the_script_only(onnx_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails even where TensorRT exists
    out = tmp_path / "trt" / "model.plan"
    assert main(["engine", "--onnx", str(onnx_dir), "--out", str(out), "--precision", "fp16"]) == 0
    printed = capsys.readouterr().out
    assert "engine was NOT built" in printed and "max_aux_streams 2" in printed
    assert not out.exists()
    assert "--fp16" in (onnx_dir / "build_engine.sh").read_text()


def test_cli_engine_with_fake_tensorrt_builds(onnx_dir, tmp_path, capsys, monkeypatch):
    trt, calls = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    out = tmp_path / "trt" / "model.plan"
    assert main(["engine", "--onnx", str(onnx_dir), "--out", str(out), "--aux-streams", "1"]) == 0
    assert out.read_bytes() == b"PLAN" and calls["config"].max_aux_streams == 1
    assert "built" in capsys.readouterr().out


@pytest.mark.parametrize("setup,message", [
    ("missing", "does not exist"),
    ("corrupt", "not a readable ONNX"),
    ("no_past", "past_key_values.0.key"),
    ("bad_settings", "opt 300 <= max 255"),
])
def test_bad_input_gives_one_line_error(tmp_path, capsys, setup, message):
    path = tmp_path / "model.onnx"
    extra = []
    if setup == "corrupt":
        path.write_bytes(b"not an onnx file")
    elif setup == "no_past":
        write_contract_onnx(path, layers=0)
    elif setup == "bad_settings":
        write_contract_onnx(path)
        extra = ["--opt-past", "300", "--max-context", "256"]
    assert main(["engine", "--onnx", str(path), "--out", str(tmp_path / "e.plan"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
