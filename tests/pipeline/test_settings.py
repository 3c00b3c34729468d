"""Settings written once: the worker's argv round-trips every field, the build's defaults are the commands'."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
import tomllib
from cqil.engines.bench_settings import BenchSettings, RankBenchSettings
from cqil.engines.tensorrt.options import EngineOptions
from cqil.export import choices
from cqil.model.errors import CqilError
from cqil.model.settings import spelled_fields
from cqil.pipeline import build_config
from cqil.pipeline.cli import build_parser, main
from cqil.pipeline.commands.bench import BenchOutput, CostModelOutput
from cqil.pipeline.commands.export import ExportSettings
from cqil.pipeline.commands.generate import GenerateSettings
from cqil.pipeline.commands.options import PLAN_FLAGS
from cqil.pipeline.commands.plan import LatencySettings, PruneSettings
from cqil.pipeline.commands.ranks import RankOptions, worker_argv
from cqil.pipeline.plan_choice import PlanChoice
from cqil.pipeline.rank_worker import build_parser as worker_parser
from cqil.pipeline.settings import from_args, to_argv


def flagged(cls: type, skip: tuple[str, ...] = ()) -> list[str]:
    return [field.name for field, spell in spelled_fields(cls) if spell.flags and field.name not in skip]


def assert_every_field_differs_from_its_default(settings, skip: tuple[str, ...] = ()) -> None:
    """So that a round trip cannot pass by falling back to the defaults, and a new field must be added here."""
    defaults = {f.name: f.default for f in dataclasses.fields(settings)}
    for name in flagged(type(settings), skip):
        assert getattr(settings, name) != defaults[name], name


@pytest.fixture
def plan_file(tmp_path) -> Path:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"groups": [[0], [1, 2], [3]], "bypass": 1}))
    return path


@pytest.mark.parametrize("command", ["generate", "bench"])
def test_the_worker_argv_round_trips_every_field(command, tiny_model_dir, tmp_path, plan_file):
    model = tiny_model_dir("llama")
    choice = PlanChoice(plan=plan_file, uniform="1:5:2", groups="1-2", bypass=1)  # exclusive: checked later
    ranks = RankOptions(ranks=3, backend="gloo", timeout=7.5)
    if command == "generate":
        parts = [GenerateSettings(prompts=("def main", "a, b  c"), max_new_tokens=5, raw=True)]
    else:
        parts = [RankBenchSettings(batch=2, seq=9, past=11, prefill_repeats=4, decode_repeats=6, warmup=0, threads=2,
                                   one_process_threads=3),
                 BenchOutput(out=tmp_path / "b.json", chart=tmp_path / "c.png", json=True)]
    for settings in (choice, ranks, *parts):
        assert_every_field_differs_from_its_default(settings, skip=("official",) if settings is choice else ())
    args = argparse.Namespace(**dataclasses.asdict(choice), **dataclasses.asdict(ranks))
    argv = worker_argv(command, args, model, parts[0])
    for extra in parts[1:]:
        argv += to_argv(extra)

    parsed = worker_parser().parse_args(argv)

    assert parsed.command == command and Path(parsed.model) == model
    assert {name: getattr(parsed, name) for name in PLAN_FLAGS} == {name: getattr(choice, name) for name in PLAN_FLAGS}
    assert from_args(RankOptions, parsed, ranks=3) == ranks  # --ranks is torchrun's, not the worker's
    for settings in parts:
        assert from_args(type(settings), parsed) == settings


def test_old_worker_spellings_still_parse(tiny_model_dir):
    parsed = worker_parser().parse_args(["bench", "--model", str(tiny_model_dir("llama")), "--rank-threads", "2"])
    assert from_args(RankBenchSettings, parsed).threads == 2


def test_the_worker_and_cqil_bench_share_their_defaults(tiny_model_dir):
    model = str(tiny_model_dir("llama"))
    worker = from_args(RankBenchSettings, worker_parser().parse_args(["bench", "--model", model]))
    cli = from_args(BenchSettings, build_parser().parse_args(["bench", "--model", model]))
    shared = [name for name in flagged(BenchSettings) if name != "threads"]  # threads: per rank vs per process
    assert {name: getattr(worker, name) for name in shared} == {name: getattr(cli, name) for name in shared}
    assert (cli.prefill_repeats, cli.decode_repeats) == (20, 100)  # the worker's own parser had drifted to 10/50


def cli_defaults(*argv: str) -> dict:
    return vars(build_parser().parse_args(list(argv)))


# What the build deliberately sets otherwise than the commands (docs/cli.md, "Settings"); all else must match.
BUILD_OWN = {
    "analyze": {"max_chunks": 16},
    "plan": {"auto": True, "bypass": 1, "target_depth": 23, "eval_chunks": 8},
    "recover": {"steps": 80, "lr": 1e-3, "warmup_steps": 3, "label_weight": 1.0, "eval_every": 20, "eval_chunks": 8,
                "save_every": 20},
    "engines": {"precision": "fp16"},
    "validate": {"decode_steps": 4},
}


def test_the_build_defaults_are_the_commands_defaults(tiny_model_dir, tmp_path):
    model = str(tiny_model_dir("llama"))
    commands = {  # section -> the defaults `cqil <command>` parses to, read back through argparse
        "data": cli_defaults("eval", "--model", model),
        "analyze": cli_defaults("eval", "--model", model),
        "plan": cli_defaults("plan", "--model", model),
        "recover": cli_defaults("finetune", "--model", model, "--steps", "1"),
        "export": cli_defaults("export", "--model", model),
        "engines": cli_defaults("engine", "--onnx", model, "--out", str(tmp_path / "m.plan")),
        "validate": cli_defaults("validate", "--onnx", model),
        "bench": cli_defaults("bench", "--model", model),
        "package": cli_defaults("triton", "--onnx", model, "--out", str(tmp_path / "t")),
    }
    commands["plan"]["calibration_chunks"] = commands["plan"]["max_chunks"]  # `cqil plan`'s --max-chunks
    unset = {"threads": 0, "data": "", "eval_data": "", "max_kl": 0.0, "alpha": 0.0, "uniform": "", "groups": ""}
    for section, defaults in build_config.DEFAULTS.items():
        if section not in commands:
            continue
        for key, value in defaults.items():
            if key in BUILD_OWN.get(section, {}):
                assert value == BUILD_OWN[section][key], f"{section}.{key}"
                continue
            if key not in commands[section]:
                continue  # a build-only key (second_eval, quality_chunks, recover.seq_len, the plan's source)
            expected = commands[section][key]
            expected = ",".join(expected) if isinstance(expected, tuple) else expected
            assert value == (unset[key] if expected is None else expected), f"{section}.{key}"
    bench = build_config.DEFAULTS["bench"]
    assert (bench["prefill_repeats"], bench["decode_repeats"], bench["threads"]) == (20, 100, 0)


def test_the_resolved_config_round_trips_through_build_toml(tmp_path):
    config = build_config.load_config(overrides=["bench.repeats=3", 'recover.targets="q_proj,v_proj"'])
    (tmp_path / "build.toml").write_text(build_config.to_toml(config))
    assert tomllib.loads((tmp_path / "build.toml").read_text()) == config
    assert build_config.load_config(tmp_path / "build.toml") == config
    assert config["bench"]["prefill_repeats"] == 3  # `repeats`, the old key, is today's prefill_repeats
    recover = build_config.section_settings(config, "recover", build_config.BuildRecover)
    assert recover.targets == ("q_proj", "v_proj") and recover.steps == 80


@pytest.mark.parametrize("override, message", [
    ("bench.repeats=0", "--set: bench.repeats must be at least 1 (got 0)"),
    ("bench.prefill_repeats=0", "--set: bench.prefill_repeats must be at least 1 (got 0)"),
    ("recover.steps=-5", "--set: recover.steps must be at least 0 (got -5)"),
    ("data.seq_len=0", "--set: data.seq_len must be at least 2 (got 0)"),
    ('export.dtype="fp64"', "--set: export.dtype must be one of fp32, fp16, int8, int4 (got 'fp64')"),
    ("recover.lr=-1", "--set: recover.lr must be positive (got -1.0)"),
    ("engines.opt_seq=1000", "[engines] seq range: need 1 <= opt 1000 <= max 512"),
])
def test_a_build_value_is_checked_as_its_flag_is(override, message):
    with pytest.raises(CqilError) as caught:
        build_config.load_config(overrides=[override])
    assert str(caught.value).startswith(message)
    assert "--prefill-repeats" not in str(caught.value)


def parsed_settings(cls: type, *argv: str):
    return from_args(cls, build_parser().parse_args(list(argv)))


def test_cqil_engine_flags_are_engine_options_fields(tmp_path):
    onnx, out = str(tmp_path), str(tmp_path / "m.plan")
    options = EngineOptions(precision="bf16", aux_streams=3, opt_batch=2, max_batch=3, opt_seq=8, max_seq=16,
                            opt_past=32, max_context=64, workspace_mib=512, timing_cache=tmp_path / "t.cache")
    assert_every_field_differs_from_its_default(options)
    assert parsed_settings(EngineOptions, "engine", "--onnx", onnx, "--out", out, *to_argv(options)) == options
    assert parsed_settings(EngineOptions, "engine", "--onnx", onnx, "--out", out) == EngineOptions()


def test_the_pruning_latency_and_cost_options_are_settings(tiny_model_dir, tmp_path):
    model = str(tiny_model_dir("llama"))
    cost = tmp_path / "cost.json"
    cost.write_text("{}")
    latency = LatencySettings(latency_budget=0.5, cost_model=cost, layout="fused")
    pruning = PruneSettings(prune=2, method="block-influence")
    measured = CostModelOutput(cost_model=tmp_path / "c.json", cost_max_group_size=3, cost_layouts=("fused",))
    for settings in (latency, pruning, measured):
        assert_every_field_differs_from_its_default(settings)
    assert parsed_settings(LatencySettings, "plan", "--model", model, *to_argv(latency)) == latency
    assert parsed_settings(PruneSettings, "plan", "--model", model, *to_argv(pruning)) == pruning
    assert parsed_settings(CostModelOutput, "bench", "--model", model, *to_argv(measured)) == measured
    assert parsed_settings(CostModelOutput, "bench", "--cost-layouts", " fused, branches,fused").cost_layouts == (
        "fused", "branches")
    assert CostModelOutput().cost_layouts == ("branches", "fused")  # what --cost-layouts defaulted to


@pytest.mark.parametrize("argv, message", [
    (["bench", "--cost-layouts", "packed"], "--cost-layouts packed must list branches and/or fused"),
    (["bench", "--cost-max-group-size", "1"], "--cost-max-group-size 1 must be at least 2"),
    (["plan", "--layout", "wide"], "--layout wide must be one of branches, fused"),
    (["plan", "--method", "random"], "--method random must be one of block-influence, greedy"),
    (["plan", "--latency-budget", "1.5"], "--latency-budget 1.5 must be in (0, 1]"),
    (["engine", "--precision", "int8"], "--precision int8 must be one of fp32, fp16, bf16"),
])
def test_a_bad_generated_option_is_one_line_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_the_export_choices_are_spelled_once():
    from cqil.export import precision, writer

    assert (writer.LAYOUTS, writer.TARGETS, precision.PRECISIONS) == (choices.LAYOUTS, choices.TARGETS,
                                                                     choices.PRECISIONS)
    fields = {f.name: spell.check for f, spell in spelled_fields(ExportSettings)}
    for name, allowed in (("layout", choices.LAYOUTS), ("target", choices.TARGETS),
                          ("precision", choices.PRECISIONS)):
        assert [value for value in (*choices.LAYOUTS, *choices.TARGETS, *choices.PRECISIONS, "bf16")
                if _accepts(fields[name], value)] == list(allowed), name


def _accepts(check, value: str) -> bool:
    try:
        check(value)
    except ValueError:
        return False
    return True
