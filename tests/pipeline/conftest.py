"""One real tiny `cqil build`, shared by the modules that read it (tests that change it work on a copy)."""

from __future__ import annotations

from pathlib import Path

import pytest

# Small enough for seconds per stage on a tiny model, every stage still doing its real work.
SMALL = ["--set", "data.seq_len=32", "--set", "analyze.max_chunks=4", "--set", "recover.steps=4",
         "--set", "recover.seq_len=32", "--set", "validate.chunks=2", "--set", "validate.quality_chunks=4",
         "--set", "bench.seq=8", "--set", "bench.past=8", "--set", "bench.repeats=3",
         "--set", "plan.uniform=\"1:5:2\"", "--set", "engines.opt_seq=16", "--set", "engines.max_seq=32",
         "--set", "engines.opt_past=16", "--set", "engines.max_context=64"]

# Files that carry wall-clock measurements, so two builds cannot share their bytes.
TIMED = {("recover", "adapter/training_run.json"), ("bench", "latency.json"), ("bench", "latency.png")}


def build_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["build", "--model", str(model), "--out", str(out), *SMALL, *extra]


@pytest.fixture(scope="session")
def built(tiny_model_dir, tmp_path_factory):
    """(model dir, build dir) of one tiny build; read it, or copy it before changing anything."""
    from cqil.pipeline.cli import main

    model = tiny_model_dir("llama")
    out = tmp_path_factory.mktemp("build") / "artifacts"
    assert main(build_args(model, out)) == 0
    return model, out
