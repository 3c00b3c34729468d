"""Stage keys come from declared inputs: changing any configuration value or input file reruns exactly
the stages that read it and those downstream of them.

The table below is written from what each stage's function reads (pipeline/build.py's stage bodies),
independently of make_stages' declarations; the cases are generated from build_config.DEFAULTS, so a new
configuration key fails here until the table says which stages read it. Keys are computed without
running any stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cqil.pipeline.build import make_stages
from cqil.pipeline.build_config import DEFAULTS, STAGE_ORDER, load_config
from cqil.pipeline.stages import Stage, StageContext, stage_keys

TEXT_KEYS = {"data.data", "data.eval_data", "data.seq_len"}
# What each stage's function reads: "section.*" for a whole section, "section.key" for one value.
READS = {
    "source": {"source.*"},
    "analyze": {"analyze.*", *TEXT_KEYS},
    "plan": {"plan.*"},  # + the training text when the plan is searched (auto)
    "recover": {"recover.*", "data.data", "data.eval_data", "data.mix", "data.mix_fraction"},
    "merge": set(),
    "export": {"export.*"},
    "engines": {"engines.*"},
    "validate": {"validate.*", *TEXT_KEYS, "data.second_eval", "plan.auto", "plan.max_group_size"},
    # on (compare.enabled); off, it reads only its own section and opens nothing
    "compare": {"compare.*", "recover.*", *TEXT_KEYS, "data.mix", "data.mix_fraction", "data.second_eval",
                "plan.max_group_size", "plan.head_every"},
    "serve": {"serve.*", "export.block_size", "export.int4_method", "export.int8_matmuls", "export.accuracy_level",
              "validate.chunks", "validate.decode_steps", *TEXT_KEYS},
    "bench": {"bench.*"},
    "package": {"package.*"},
}
# The stages whose output folders each stage opens.
OPENS = {
    "source": set(), "analyze": {"source"}, "plan": {"source"}, "recover": {"source", "plan"},
    "merge": {"source", "plan", "recover"}, "export": {"merge"}, "engines": {"export"},
    "validate": {"source", "recover", "merge", "export"}, "serve": {"merge"}, "compare": {"source", "plan"},
    "bench": {"source", "merge", "export"},
    "package": {"export", "engines"},
}


def expected_reruns(changed: set[str], auto: bool, compare: bool = False) -> set[str]:
    """The stages that read one of `changed` (config names or input-file names), and everything downstream."""
    def reads(stage: str) -> set[str]:
        if stage == "compare" and not compare:
            return {"compare.*"}
        return READS[stage] | (TEXT_KEYS if stage == "plan" and auto else set())

    def opens(stage: str) -> set[str]:
        return set() if stage == "compare" and not compare else OPENS[stage]

    rerun = {stage for stage in STAGE_ORDER
             if any(name in reads(stage) or f"{name.split('.')[0]}.*" in reads(stage) for name in changed)}
    for stage in STAGE_ORDER:  # in order: an upstream stage is settled before its readers
        if opens(stage) & rerun:
            rerun.add(stage)
    return rerun


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    files = {"model": Path(shutil.copytree(tiny_model_dir("llama"), root / "model")),
             "other_model": tiny_model_dir("llama", 4)}
    for name in ("train.txt", "eval.txt", "second.txt", "mix.txt"):
        (root / name).write_text(f"{name} text\n")
        files[name] = root / name
    (root / "plan.json").write_text(json.dumps({"groups": [[0], [1, 2], [3], [4], [5]], "bypass": 1}))
    files["plan.json"] = root / "plan.json"
    return files


def toml(value) -> str:
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


def keys_of(overrides: dict[str, object]) -> dict[str, str]:
    config = load_config(None, [f"{name}={toml(value)}" for name, value in overrides.items()])
    stages = make_stages(config)
    assert [s.name for s in stages] == list(STAGE_ORDER)
    return stage_keys(stages)


def alternative(name: str, default, inputs: dict[str, Path]) -> dict[str, object]:
    """Overrides that give configuration key `name` another valid value (and what that needs besides)."""
    if name == "plan.auto":  # off, it needs an explicit plan
        return {name: False, "plan.uniform": "1:5:2"}
    if name == "engines.opt_batch":  # the engine's batch range needs opt <= max
        return {name: 2, "engines.max_batch": 2}
    if name in ("export.block_size", "export.accuracy_level"):  # MatMulNBits takes powers of two; levels 0-4
        return {name: {"export.block_size": 16, "export.accuracy_level": 0}[name]}
    strings = {"source.model": str(inputs["other_model"]), "data.data": str(inputs["train.txt"]),
               "data.eval_data": str(inputs["eval.txt"]), "data.second_eval": str(inputs["second.txt"]),
               "data.mix": str(inputs["mix.txt"]),
               "plan.uniform": "1:5:2", "plan.groups": "1-2,3-4", "plan.file": str(inputs["plan.json"]),
               "plan.bypass_choices": "0,1", "export.layout": "fused", "export.precision": "int8",
               "export.target": "onnxruntime", "export.int4_method": "hqq", "export.int8_matmuls": "lm_head",
               "bench.schedule": "packed", "recover.targets": "q_proj,v_proj",
               "engines.precision": "fp32", "package.name": "other", "serve.target": "portable",
               "serve.layout": "branches", "serve.precisions": "fp32"}
    if isinstance(default, bool):
        return {name: not default}
    if isinstance(default, int):
        return {name: default + 1}
    if isinstance(default, float):  # halved: fractions such as dropout or proxy_keep stay in range
        return {name: default / 2 if default else 0.5}
    assert name in strings, f"give {name} an alternative value in this test, and its readers in READS"
    return {name: strings[name]}


CONFIG_KEYS = [f"{section}.{key}" for section, values in DEFAULTS.items() for key in values if section != "source"]


@pytest.mark.parametrize("compare", [False, True], ids=["compare-off", "compare-on"])
@pytest.mark.parametrize("name", ["source.model", *CONFIG_KEYS])
def test_each_configuration_value_reruns_exactly_its_readers(name, compare, inputs):
    base = {"source.model": str(inputs["model"]), **({"compare.enabled": True} if compare else {})}
    before = keys_of(base)
    section, key = name.split(".")
    overrides = alternative(name, DEFAULTS[section][key], inputs)
    if compare and name == "compare.enabled":  # on in the base: off is the other value
        overrides = {name: False}
    after = keys_of({**base, **overrides})
    changed = set(overrides) | ({"plan.auto"} if name in ("plan.uniform", "plan.groups", "plan.file") else set())
    assert {s for s in STAGE_ORDER if before[s] != after[s]} == expected_reruns(changed, auto=True, compare=compare)


EXPLICIT = {"plan.file": "plan.json", "data.data": "train.txt", "data.eval_data": "eval.txt",
            "data.second_eval": "second.txt", "data.mix": "mix.txt"}


@pytest.mark.parametrize("compare", [False, True], ids=["compare-off", "compare-on"])
@pytest.mark.parametrize("auto", [False, True], ids=["plan-file", "auto-plan"])
@pytest.mark.parametrize("name", [*EXPLICIT, "source.model"])
def test_each_input_files_content_reruns_exactly_its_readers(name, auto, compare, inputs):
    config = {"source.model": str(inputs["model"]), **{key: str(inputs[file]) for key, file in EXPLICIT.items()},
              "compare.enabled": compare}
    if auto:
        config = {**config, "plan.auto": True, "plan.file": ""}
        if name == "plan.file":
            pytest.skip("an automatic plan reads no plan file")
    before = keys_of(config)
    path = inputs["model"] / "config.json" if name == "source.model" else inputs[EXPLICIT[name]]
    original = path.read_bytes()
    try:
        path.write_bytes(original + b"\n")  # same meaning to most readers, other bytes: still a new input
        after = keys_of(config)
    finally:
        path.write_bytes(original)
    assert {s for s in STAGE_ORDER if before[s] != after[s]} == expected_reruns({name}, auto=auto, compare=compare)
    assert keys_of(config) == before


def test_a_stage_cannot_open_a_stage_it_did_not_declare(tmp_path):
    ctx = StageContext(out=tmp_path, build_dir=tmp_path, params={}, key="k", reads=("a",))
    assert ctx.upstream("a") == tmp_path / "a"
    with pytest.raises(RuntimeError, match="without declaring it"):
        ctx.upstream("b")


def test_a_missing_input_file_is_refused_before_any_stage_runs(tmp_path):
    from cqil.model.errors import CqilError

    stages = [Stage("a", lambda ctx: None, files={"data.data": tmp_path / "absent.txt"})]
    with pytest.raises(CqilError, match="data.data '.*absent.txt' does not exist"):
        stage_keys(stages)
