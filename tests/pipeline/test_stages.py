"""The build-once stage runner: skip, selective rerun, resume after kill -9, lock, verify."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from cqil.model.errors import CqilError
from cqil.pipeline.stages import Stage, build_lock, run_stages

STAGES_SOURCE = textwrap.dedent('''
    import os, time
    from pathlib import Path
    from cqil.pipeline.stages import Stage

    def write(name):
        def run(ctx):
            upstream = "".join((ctx.upstream(n) / "out.txt").read_text() for n in ctx.params.get("reads", []))
            (ctx.out / "out.txt").write_text(f"{name}:{ctx.params['value']}|{upstream}")
            if name == "b" and os.environ.get("HANG_IN_B"):
                (ctx.out / "partial.bin").write_bytes(b"x" * 1000)
                Path(os.environ["HANG_IN_B"]).touch()
                time.sleep(60)
            return {"value": ctx.params["value"]}
        return run

    def make(values):
        return [
            Stage("a", write("a"), {"value": values["a"]}),
            Stage("b", write("b"), {"value": values["b"], "reads": ["a"]}, after=["a"]),
            Stage("c", write("c"), {"value": values["c"], "reads": ["a"]}, after=["a"]),
            Stage("d", write("d"), {"value": values["d"], "reads": ["b"]}, after=["b"]),
        ]
''')

VALUES = {"a": 1, "b": 2, "c": 3, "d": 4}


@pytest.fixture
def stages_module(tmp_path, monkeypatch):
    (tmp_path / "demo_stages.py").write_text(STAGES_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import demo_stages
    return importlib.reload(demo_stages)


def _run(stages, build, **kwargs):
    return {r.name: r.status for r in run_stages(stages, build, log=lambda _m: None, **kwargs)}


def test_second_run_skips_and_one_change_reruns_only_downstream(tmp_path, stages_module):
    build = tmp_path / "build"
    assert _run(stages_module.make(VALUES), build) == dict.fromkeys("abcd", "ran")
    assert _run(stages_module.make(VALUES), build) == dict.fromkeys("abcd", "skipped")
    changed = _run(stages_module.make({**VALUES, "b": 20}), build)
    assert changed == {"a": "skipped", "b": "ran", "c": "skipped", "d": "ran"}
    assert (build / "d" / "out.txt").read_text() == "d:4|b:20|a:1|"
    assert _run(stages_module.make({**VALUES, "b": 20}), build, force=["c"])["c"] == "ran"


def test_until_stops_and_unknown_stage_is_refused(tmp_path, stages_module):
    build = tmp_path / "build"
    assert list(_run(stages_module.make(VALUES), build, until="b")) == ["a", "b"]
    assert not (build / "c").exists()
    with pytest.raises(CqilError, match="unknown stage 'zz'"):
        _run(stages_module.make(VALUES), build, force=["zz"])


def test_killed_build_leaves_no_half_stage_and_resumes_to_the_same_hashes(tmp_path, stages_module):
    build, marker = tmp_path / "killed", tmp_path / "in-b"
    script = ("import sys, demo_stages; from cqil.pipeline.stages import run_stages; "
              f"run_stages(demo_stages.make({VALUES!r}), __import__('pathlib').Path({str(build)!r}))")
    env = {**os.environ, "HANG_IN_B": str(marker),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, "the build did not reach stage b"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (build / "a" / ".stage.json").exists() and not (build / "b").exists()
    assert _run(stages_module.make(VALUES), build) == {"a": "skipped", "b": "ran", "c": "ran", "d": "ran"}
    assert not [p for p in build.iterdir() if p.name.startswith(".b.tmp")]  # leftovers are not stages

    clean = tmp_path / "clean"
    _run(stages_module.make(VALUES), clean)
    for name in "abcd":
        files = lambda d: json.loads((d / name / ".stage.json").read_text())["files"]  # noqa: E731
        assert files(build) == files(clean)


def test_a_concurrent_build_is_refused(tmp_path, stages_module):
    build = tmp_path / "build"
    with build_lock(build):
        code = ("import demo_stages, pathlib; from cqil.pipeline.stages import run_stages; "
                f"run_stages(demo_stages.make({VALUES!r}), pathlib.Path({str(build)!r}))")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.getcwd()])}
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "another build is running" in result.stderr
    assert f"pid {os.getpid()}" in result.stderr


def test_a_record_is_a_cache_never_the_authority(tmp_path, stages_module):
    """A stage whose files differ from its record, or whose record is broken, runs again (and only it)."""
    build = tmp_path / "build"
    _run(stages_module.make(VALUES), build)
    (build / "b" / "out.txt").write_text("tampered")
    (build / "c" / ".stage.json").write_text("{}")
    (build / "d" / "extra.txt").write_text("new")
    assert _run(stages_module.make(VALUES), build) == {"a": "skipped", "b": "ran", "c": "ran", "d": "ran"}
    assert (build / "b" / "out.txt").read_text() == "b:2|a:1|" and not (build / "d" / "extra.txt").exists()
    record = json.loads((build / "a" / ".stage.json").read_text())
    assert record["files"] == {"out.txt": {"sha256": hashlib.sha256(b"a:1|").hexdigest(), "size": 4}}


def test_until_keeps_the_later_stages_that_are_still_up_to_date(tmp_path, stages_module):
    build = tmp_path / "build"
    _run(stages_module.make(VALUES), build)
    assert _run(stages_module.make(VALUES), build, until="a") == dict.fromkeys("abcd", "skipped")
    assert _run(stages_module.make({**VALUES, "b": 7}), build, until="a") == {"a": "skipped"}


def test_a_stage_reading_a_later_stage_is_refused(tmp_path):
    stages = [Stage("x", lambda ctx: None, after=["y"]), Stage("y", lambda ctx: None)]
    with pytest.raises(CqilError, match="reads \\['y'\\]"):
        run_stages(stages, tmp_path, log=lambda _m: None)
