"""TensorRT through Polygraphy, without TensorRT: engine settings from the ONNX contract, Polygraphy's
loader objects and their arguments, and the scripts for a GPU host, whose command lines are parsed
with Polygraphy's own tool argument groups and compared with the loaders `cqil engine` builds.

TensorRT is absent here: `create_config` reads two of its enums, supplied by a stand-in module in
sys.modules; the build itself (the loader chain's call) is replaced where a test needs one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from cqil.engines.tensorrt import build as trt_build
from cqil.engines.tensorrt import script as trt_script
from cqil.engines.tensorrt import settings as trt_settings
from cqil.engines.tensorrt.settings import EngineOptions, ShapeRange
from cqil.export.contract import PLAN_KEY
from cqil.model.errors import CqilError
from cqil.model.plan import Plan
from cqil.pipeline.cli import main
from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, SaveEngine
from polygraphy.exception import PolygraphyException

LAYERS, KV_HEADS, HEAD_DIM, VOCAB = 4, 2, 8, 16
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
    outputs = [value("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB])]
    nodes = [helper.make_node("Cast", ["input_ids"], ["ids_float"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["ids_float", "axis"], ["logits"])]
    for i in range(layers):
        for kind in ("key", "value"):
            dims = ["batch", KV_HEADS, "past", HEAD_DIM]
            inputs.append(value(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, dims))
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


@pytest.fixture
def fake_trt(monkeypatch):
    """A stand-in `tensorrt` module with the enums our loaders name, and the inspector's format."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0"
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.ProfilingVerbosity = types.SimpleNamespace(DETAILED="DETAILED")
    trt.LayerInformationFormat = types.SimpleNamespace(JSON="JSON")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


OPTIONS = EngineOptions(opt_batch=2, max_batch=4, opt_seq=16, max_seq=64, opt_past=100, max_context=256)
FP16 = EngineOptions(precision="fp16", workspace_mib=2048, opt_batch=2, max_batch=4, opt_seq=16, max_seq=64,
                     opt_past=100, max_context=256)


def test_profiles_follow_the_contract(onnx_dir, tmp_path):
    settings = trt_settings.engine_settings(onnx_dir, tmp_path / "trt" / "model.plan", OPTIONS)
    assert settings.aux_streams == 2  # largest group (3 layers) - 1
    prefill, decode = settings.profiles
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
        trt_settings.engine_settings(path, tmp_path / "e.plan", OPTIONS)
    settings = trt_settings.engine_settings(path, tmp_path / "e.plan", EngineOptions(aux_streams=0))
    assert settings.aux_streams == 0 and "position_ids" not in settings.profiles[0]


def test_loader_chain_and_its_arguments(onnx_dir, tmp_path, fake_trt):
    """SaveEngine(EngineFromNetwork(NetworkFromOnnxPath(onnx), CreateConfig(...))) — built, not called."""
    settings = trt_settings.engine_settings(onnx_dir, tmp_path / "trt" / "model.plan", FP16)
    loader = trt_build.engine_loader(settings, tmp_path / "out.plan")
    assert isinstance(loader, SaveEngine) and loader.path == str(tmp_path / "out.plan")
    build = loader._engine
    assert isinstance(build, EngineFromNetwork)
    assert build.timing_cache_path == str(tmp_path / "trt" / "timing.cache")
    network = build._network
    assert isinstance(network, NetworkFromOnnxPath) and network.path == str(onnx_dir / "model.onnx")
    config = build._config
    assert isinstance(config, CreateConfig)
    assert config.fp16 and not config.bf16 and config.max_aux_streams == 2
    assert config.timing_cache_path == str(tmp_path / "trt" / "timing.cache")
    assert config.profiling_verbosity == "DETAILED" and config.memory_pool_limits == {"WORKSPACE": 2048 << 20}
    prefill, decode = config.profiles
    assert list(prefill) == list(settings.profiles[0])
    for name in ("input_ids", "attention_mask", "past_key_values.3.value"):
        for which in ("min", "opt", "max"):
            assert tuple(getattr(prefill[name], which)) == getattr(settings.profiles[0][name], which)
            assert tuple(getattr(decode[name], which)) == getattr(settings.profiles[1][name], which)
    assert tuple(decode["attention_mask"].max) == (4, 256)
    bf16 = trt_build.create_config(trt_settings.engine_settings(onnx_dir, tmp_path / "e.plan",
                                                               EngineOptions(precision="bf16", aux_streams=5)))
    assert bf16.bf16 and not bf16.fp16 and bf16.max_aux_streams == 5 and bf16.memory_pool_limits is None


def parse_polygraphy(tool_name: str, argv: list[str], cwd: Path):
    """Parse a command line with the Polygraphy tool's own argument groups, as `polygraphy <tool>` does."""
    from polygraphy.tools.convert import Convert
    from polygraphy.tools.run import Run

    tool = {"convert": Convert, "run": Run}[tool_name]()
    old = os.getcwd()
    os.chdir(cwd)  # paths in the commands are relative to the scripts' folder
    try:
        tool.parse(tool.setup_parser().parse_args(argv))
    finally:
        os.chdir(old)
    return tool


def assert_config_matches(tool, settings, base: Path) -> None:
    """Polygraphy's parsed TensorRT config equals the CreateConfig that `cqil engine` builds."""
    from polygraphy.tools.args import TrtConfigArgs, TrtLoadEngineBytesArgs

    parsed, ours = tool.arg_groups[TrtConfigArgs], trt_build.create_config(settings)
    assert len(parsed.profile_dicts) == len(ours.profiles) == 2
    for parsed_profile, profile in zip(parsed.profile_dicts, ours.profiles):
        assert list(parsed_profile) == list(profile)
        assert {name: tuple(map(tuple, shapes)) for name, shapes in parsed_profile.items()} == {
            name: (tuple(r.min), tuple(r.opt), tuple(r.max)) for name, r in profile.items()}
    assert bool(parsed.fp16) == ours.fp16 and bool(parsed.bf16) == ours.bf16
    assert parsed.max_aux_streams == ours.max_aux_streams
    assert (base / parsed.load_timing_cache).resolve() == Path(ours.timing_cache_path).resolve()
    saved = tool.arg_groups[TrtLoadEngineBytesArgs].save_timing_cache
    assert (base / saved).resolve() == settings.timing_cache.resolve()
    assert str(parsed.profiling_verbosity) == f"trt.ProfilingVerbosity.{ours.profiling_verbosity}"
    pools = {str(key): value for key, value in (parsed.memory_pool_limits or {}).items()}
    assert pools == {f"trt.MemoryPoolType.{key}": value for key, value in (ours.memory_pool_limits or {}).items()}


@pytest.mark.parametrize("options", [OPTIONS, FP16], ids=["fp32", "fp16-workspace"])
def test_convert_command_parses_to_the_same_config(onnx_dir, tmp_path, fake_trt, options):
    from polygraphy.tools.args import ModelArgs, OnnxLoadArgs

    settings = trt_settings.engine_settings(onnx_dir, tmp_path / "trt" / "model.plan", options)
    command = trt_script.convert_command(settings, onnx_dir)
    assert command[:7] == ["polygraphy", "convert", "model.onnx", "--convert-to", "trt", "-o", "../trt/model.plan"]
    tool = parse_polygraphy("convert", command[2:], onnx_dir)
    assert tool.arg_groups[ModelArgs].model_type == "onnx"
    # no ONNX-side rewriting: polygraphy convert parses the file itself (NetworkFromOnnxPath), as we do
    assert not tool.arg_groups[OnnxLoadArgs].must_use_onnx_loader(disable_custom_outputs=True)
    assert_config_matches(tool, settings, onnx_dir)


@pytest.mark.filterwarnings("ignore:SelectableGroups:DeprecationWarning")  # polygraphy run reads its plugins
def test_check_commands_parse_with_polygraphy_run(onnx_dir, tmp_path, fake_trt):
    from polygraphy.tools.args import CompareFuncSimpleArgs, DataLoaderArgs, RunnerSelectArgs, TrtRunnerArgs

    settings = trt_settings.engine_settings(onnx_dir, tmp_path / "trt" / "model.plan", FP16)
    commands = trt_script.check_commands(settings, onnx_dir)
    for profile, loader, command in zip((0, 1), ("load_prefill", "load_decode"), commands):
        assert command[:3] == ["polygraphy", "run", "model.onnx"]
        tool = parse_polygraphy("run", command[2:], onnx_dir)
        assert [name for name, _ in tool.arg_groups[RunnerSelectArgs].runners] == ["onnxrt", "trt"]
        assert tool.arg_groups[TrtRunnerArgs].optimization_profile == profile
        data = tool.arg_groups[DataLoaderArgs]
        assert (data.data_loader_script, data.data_loader_func_name) == ("data_loader.py", loader)
        tolerances = tool.arg_groups[CompareFuncSimpleArgs]
        assert tolerances.atol == {"": 0.05, "logits": 0.25} and tolerances.rtol == {"": 0.02, "logits": 0.02}
        assert_config_matches(tool, settings, onnx_dir)
    fp32 = trt_settings.engine_settings(onnx_dir, tmp_path / "trt" / "model.plan", OPTIONS)
    tool = parse_polygraphy("run", trt_script.check_commands(fp32, onnx_dir)[0][2:], onnx_dir)
    assert tool.arg_groups[CompareFuncSimpleArgs].atol == {"": 1e-3, "logits": 1e-3}


def test_scripts_run_the_same_commands(onnx_dir, tmp_path):
    """Run build_engine.sh and check_engine.sh with a stand-in polygraphy that records its arguments."""
    settings = trt_settings.engine_settings(onnx_dir, tmp_path / "trt" / "model.plan", OPTIONS)
    written = trt_script.write_engine_files(settings, onnx_dir)
    assert set(written) == {"build_engine.sh", "check_engine.sh", "data_loader.py"}
    for name in ("build_engine.sh", "check_engine.sh"):
        assert written[name] == onnx_dir / name and os.access(written[name], os.X_OK)
    text = written["build_engine.sh"].read_text()
    assert text.startswith("#!/usr/bin/env bash") and "cqil engine --onnx model.onnx --out ../trt/model.plan" in text
    record = tmp_path / "args.txt"
    fake = tmp_path / "fake-polygraphy"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$PWD" "$@" "--" >> {record}\necho "LAYERS"\n')
    fake.chmod(0o755)
    env = {**os.environ, "POLYGRAPHY": str(fake)}
    subprocess.run(["bash", str(written["build_engine.sh"])], check=True, cwd=tmp_path, env=env)
    subprocess.run(["bash", str(written["check_engine.sh"])], check=True, cwd=tmp_path, env=env)
    calls = [call.splitlines() for call in record.read_text().split("--\n")[:-1]]
    assert all(Path(call[0]) == onnx_dir.resolve() for call in calls)
    expected = [trt_script.convert_command(settings, onnx_dir), trt_script.inspect_command(settings, onnx_dir),
                *trt_script.check_commands(settings, onnx_dir)]
    assert [call[1:] for call in calls] == [command[1:] for command in expected]
    assert (tmp_path / "trt").is_dir()  # the script makes the engine's folder
    assert (tmp_path / "trt" / "model.layers.txt").read_text() == "LAYERS\n"


def fake_build(trt, calls: list, fail: bool = False):
    """Stands in for the loader chain's call: writes the engine bytes where SaveEngine would."""
    def loader(settings, path):
        calls.append((settings, Path(path)))

        def build():
            Path(path).write_bytes(b"PLAN")
            if fail:
                raise PolygraphyException("Invalid Engine. Please ensure the engine was built correctly\nmore")
            inspector = types.SimpleNamespace(get_engine_information=lambda fmt: json.dumps({"format": fmt}))
            return types.SimpleNamespace(create_engine_inspector=lambda: inspector)
        return build
    return loader


def test_build_engine_saves_last_and_cleans_up(onnx_dir, tmp_path, fake_trt, monkeypatch):
    settings = trt_settings.engine_settings(onnx_dir, tmp_path / "trt" / "model.plan", OPTIONS)
    calls: list = []
    monkeypatch.setattr(trt_build, "engine_loader", fake_build(fake_trt, calls))
    assert trt_build.build_engine(settings) == tmp_path / "trt" / "model.plan"
    assert calls[0][1] == tmp_path / "trt" / "model.plan.partial"  # saved under a partial name, renamed last
    assert (tmp_path / "trt" / "model.plan").read_bytes() == b"PLAN"
    assert json.loads((tmp_path / "trt" / "model.layers.json").read_text()) == {"format": "JSON"}
    assert not (tmp_path / "trt" / "model.plan.partial").exists()
    failed = trt_settings.engine_settings(onnx_dir, tmp_path / "bad" / "model.plan", OPTIONS)
    monkeypatch.setattr(trt_build, "engine_loader", fake_build(fake_trt, calls, fail=True))
    with pytest.raises(CqilError, match="could not build an engine") as info:
        trt_build.build_engine(failed)
    assert "\n" not in str(info.value) and "Invalid Engine" in str(info.value)
    assert list((tmp_path / "bad").iterdir()) == []  # nothing half-written


def test_cli_engine_without_tensorrt_writes_the_scripts_only(onnx_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails even where TensorRT exists
    out = tmp_path / "trt" / "model.plan"
    assert main(["engine", "--onnx", str(onnx_dir), "--out", str(out), "--precision", "fp16"]) == 0
    printed = capsys.readouterr().out
    assert "engine was NOT built" in printed and "max_aux_streams 2" in printed
    assert not out.exists()
    assert "--fp16" in (onnx_dir / "build_engine.sh").read_text()
    assert "load_decode" in (onnx_dir / "check_engine.sh").read_text()
    assert "VOCAB = 16" in (onnx_dir / "data_loader.py").read_text()


def test_cli_engine_with_tensorrt_builds(onnx_dir, tmp_path, capsys, monkeypatch, fake_trt):
    calls: list = []
    monkeypatch.setattr(trt_build, "engine_loader", fake_build(fake_trt, calls))
    out = tmp_path / "trt" / "model.plan"
    assert main(["engine", "--onnx", str(onnx_dir), "--out", str(out), "--aux-streams", "1"]) == 0
    assert out.read_bytes() == b"PLAN" and calls[0][0].aux_streams == 1
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
