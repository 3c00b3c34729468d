"""`cqil build` refuses a bad --set or build.toml value before the first stage runs, naming its TOML key."""

from __future__ import annotations

import pytest
from cqil.pipeline.cli import main

# --set value -> what the one line must say (the key as the user wrote it, never a flag they did not type)
BAD_VALUES = {
    "bench.repeats=0": "bench.repeats must be at least 1 (got 0)",
    "recover.steps=-5": "recover.steps must be at least 0 (got -5)",
    "data.seq_len=0": "data.seq_len must be at least 2 (got 0)",
    'plan.uniform="0:99:2"': "[plan] uniform plan 0:99:2 needs 0 <= S < E <= 6 (this model's layers)",
    'export.dtype="fp64"': "export.dtype must be one of fp32, fp16, int8, int4 (got 'fp64')",
    'data.eval_data="{missing}"': "data.eval_data: text source '{missing}' does not exist",
    'data.second_eval="{missing}"': "data.second_eval: text source '{missing}' does not exist",
}


def run_build(capsys, model, out, *extra):
    capsys.readouterr()  # what making the tiny model printed
    code = main(["build", "--model", str(model), "--out", str(out), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("override", list(BAD_VALUES))
def test_a_bad_set_value_stops_the_build_before_any_stage(override, tiny_model_dir, tmp_path, capsys):
    missing = tmp_path / "no-such-text.txt"
    out = tmp_path / "build"
    code, stdout, err = run_build(capsys, tiny_model_dir("llama"), out, "--set", override.format(missing=missing))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("cqil build: error: ") and BAD_VALUES[override].format(missing=missing) in lines[0]
    assert "--prefill-repeats" not in err and "--seq-len" not in err and "--steps" not in err
    assert not out.exists() and "running" not in err + stdout  # no stage ran, nothing written


def test_a_bad_value_in_build_toml_names_the_file_and_key(tiny_model_dir, tmp_path, capsys):
    config = tmp_path / "build.toml"
    config.write_text("[bench]\nrepeats = 0\n")
    out = tmp_path / "build"
    code, _, err = run_build(capsys, tiny_model_dir("llama"), out, "--config", str(config))
    assert code == 2 and err.strip() == f"cqil build: error: {config}: bench.repeats must be at least 1 (got 0)"
    assert not out.exists()
