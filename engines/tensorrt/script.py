"""The files written beside the ONNX for a GPU host: build_engine.sh (`polygraphy convert` with the same
settings as the Python build), check_engine.sh (`polygraphy run --onnxrt --trt`) and data_loader.py
(its feeds). Paths in them are relative to the folder they run from.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import numpy as np
from cqil.engines.tensorrt.settings import DECODE, PREFILL, EngineSettings, ShapeRange
from cqil.engines.tolerances import DEFAULT_THRESHOLDS
from cqil.export.contract import LOGITS
from cqil.export.standalone import contract_source
from cqil.model.errors import CqilError
from cqil.model.fsutil import atomic_write_text


def _relative(target: Path, base: Path) -> str:
    return os.path.relpath(Path(target).absolute(), Path(base).absolute())


def _shapes(profile: dict[str, ShapeRange], which: str) -> list[str]:
    return [f"{name}:[{','.join(map(str, getattr(r, which)))}]" for name, r in profile.items()]


def build_args(settings: EngineSettings, base: Path) -> list[str]:
    """Polygraphy's command-line options for the settings (the same for `convert` and `run --trt`)."""
    options, cache = settings.options, _relative(settings.timing_cache, base)
    args = []
    for profile in settings.profiles:
        for which in ("min", "opt", "max"):
            args += [f"--trt-{which}-shapes", *_shapes(profile, which)]
    if options.precision != "fp32":
        args.append(f"--{options.precision}")
    args += ["--max-aux-streams", str(settings.aux_streams)]
    if options.workspace_mib is not None:
        args += ["--pool-limit", f"workspace:{options.workspace_mib}M"]
    return args + ["--load-timing-cache", cache, "--save-timing-cache", cache, "--profiling-verbosity", "detailed"]


def convert_command(settings: EngineSettings, base: Path) -> list[str]:
    """`polygraphy convert` building the same engine; paths relative to `base`."""
    return ["polygraphy", "convert", _relative(settings.onnx, base), "--convert-to", "trt",
            "-o", _relative(settings.engine, base), *build_args(settings, base)]


def inspect_command(settings: EngineSettings, base: Path) -> list[str]:
    """`polygraphy inspect model` listing the built engine's layers (the inspector's view)."""
    return ["polygraphy", "inspect", "model", _relative(settings.engine, base), "--show", "layers", "attrs"]


def check_commands(settings: EngineSettings, base: Path) -> list[list[str]]:
    """`polygraphy run --onnxrt --trt`, once per profile with its feeds from data_loader.py.

    Tolerances are `cqil validate`'s logits and present limits for the precision (engines/validate.py).
    """
    fp32 = settings.options.precision == "fp32" and settings.spec.kv_dtype == "FLOAT"
    limits = DEFAULT_THRESHOLDS["FLOAT" if fp32 else "FLOAT16"]
    tolerances = ["--atol", f"{limits.present_atol:g}", f"{LOGITS}:{limits.logits_atol:g}",
                  "--rtol", f"{limits.present_rtol:g}", f"{LOGITS}:{limits.logits_rtol:g}"]
    return [["polygraphy", "run", _relative(settings.onnx, base), "--onnxrt", "--trt", *build_args(settings, base),
             "--optimization-profile", str(index), "--data-loader-script", f"data_loader.py:{loader}", *tolerances]
            for index, loader in ((PREFILL, "load_prefill"), (DECODE, "load_decode"))]


def cli_options(settings: EngineSettings, base: Path) -> list[str]:
    """`cqil engine` options that reproduce these settings."""
    o = settings.options
    options = [f"--precision {o.precision}", f"--aux-streams {settings.aux_streams}",
               f"--opt-batch {o.opt_batch}", f"--max-batch {o.max_batch}", f"--opt-seq {o.opt_seq}",
               f"--max-seq {o.max_seq}", f"--opt-past {o.opt_past}", f"--max-context {o.max_context}"]
    if o.workspace_mib is not None:
        options.append(f"--workspace-mib {o.workspace_mib}")
    if o.timing_cache is not None:
        options.append(f"--timing-cache {shlex.quote(_relative(o.timing_cache, base))}")
    return options


def _polygraphy(args: list[str]) -> str:
    """One `polygraphy ...` command, an option and its values per line; $POLYGRAPHY may name another executable."""
    lines = ['"${POLYGRAPHY:-polygraphy}"']
    for arg in args[1:]:
        if arg.startswith("-"):
            lines.append(shlex.quote(arg))
        else:
            lines[-1] += " " + shlex.quote(arg)
    return " \\\n  ".join(lines)


def _script(comment: list[str], lines: list[str]) -> str:
    """A bash script that runs `lines` from its own folder."""
    header = ["#!/usr/bin/env bash", *(f"# {line}" for line in comment), "set -euo pipefail", 'cd "$(dirname "$0")"']
    return "\n".join(header + lines) + "\n"


def build_script_text(settings: EngineSettings, base: Path) -> str:
    """build_engine.sh, to live in `base`: `polygraphy convert`, then the engine's layer listing."""
    engine = _relative(settings.engine, base)
    listing = str(Path(engine).with_suffix(".layers.txt"))
    comment = ["Builds the TensorRT engine for this ONNX on a GPU host with TensorRT 10 and Polygraphy",
               "(pip install polygraphy; or POLYGRAPHY=/path/to/polygraphy). Written by `cqil engine` or",
               "`cqil build`; the same build through Polygraphy's Python loaders, run in this folder:",
               " ".join(["  cqil engine --onnx", shlex.quote(_relative(settings.onnx, base)), "--out",
                         shlex.quote(engine), *cli_options(settings, base)]),
               "TensorRT logs '[MS] Number of aux streams is N' (polygraphy -v) when it uses the aux streams."]
    return _script(comment, [f"mkdir -p {shlex.quote(str(Path(engine).parent))}",
                             _polygraphy(convert_command(settings, base)),
                             _polygraphy(inspect_command(settings, base)) + f" > {shlex.quote(listing)}"])


def check_script_text(settings: EngineSettings, base: Path) -> str:
    """check_engine.sh, to live in `base` beside data_loader.py: TensorRT against ONNX Runtime, per profile."""
    comment = ["Compares TensorRT with ONNX Runtime on this ONNX with Polygraphy, on a GPU host with TensorRT 10:",
               "profile 0 on a prefill with an empty cache, profile 1 on a decode step with a cache",
               "(feeds from data_loader.py). The engine is built with build_engine.sh's settings.",
               "Tolerances: cqil validate's limits for the precision. Written by `cqil engine` or `cqil build`."]
    return _script(comment, [_polygraphy(command) for command in check_commands(settings, base)])


def data_loader_text(settings: EngineSettings, seed: int = 0) -> str:
    """data_loader.py: Polygraphy data-loader functions yielding contract feeds at the engine's opt shapes."""
    spec, o = settings.spec, settings.options
    if spec.vocab_size is None:
        raise CqilError(f"'{settings.onnx}': the logits output has no fixed vocabulary dim, so data_loader.py "
                        "cannot draw token ids: export it again with `cqil export`")
    return f'''"""Polygraphy data loader for {settings.onnx.name} (by `cqil engine` or `cqil build`; numpy only).

load_prefill: {o.opt_batch} x {o.opt_seq} tokens with an empty cache (past 0): optimization profile 0.
load_decode:  one new token over a random cache of {o.opt_past} tokens: optimization profile 1.
Row 1 of a batch is left-padded. Shapes are the engine's opt shapes; check_engine.sh runs, e.g.
  polygraphy run model.onnx --onnxrt --trt ... --optimization-profile 1 --data-loader-script data_loader.py:load_decode
"""

import numpy as np

LAYERS, KV_HEADS, HEAD_DIM = {spec.num_layers}, {spec.kv_heads}, {spec.head_dim}
CACHE_DTYPE = np.{np.dtype(spec.cache_dtype).name}
VOCAB = {spec.vocab_size}
BATCH, PREFILL_SEQ, DECODE_PAST = {o.opt_batch}, {o.opt_seq}, {o.opt_past}
INPUTS = {tuple(spec.inputs)!r}  # the contract inputs this graph declares
SEED = {seed}


{contract_source(("TOKEN_INPUTS", "mask_positions", "past_pair", "past_names"))}


def _feed(rng, seq, past):
    ids = rng.integers(0, VOCAB, size=(BATCH, seq), dtype=np.int64)
    mask = np.ones((BATCH, past + seq), dtype=np.int64)
    if BATCH > 1:
        mask[1, : (past + seq) // 4] = 0  # left padding
    feed = dict(zip(TOKEN_INPUTS, (ids, mask, mask_positions(mask, seq))))
    shape = (BATCH, KV_HEADS, past, HEAD_DIM)
    feed.update((name, rng.standard_normal(shape).astype(CACHE_DTYPE)) for name in past_names(LAYERS))
    return {{name: value for name, value in feed.items() if name in INPUTS}}


def load_prefill():
    yield _feed(np.random.default_rng(SEED), PREFILL_SEQ, 0)


def load_decode():
    yield _feed(np.random.default_rng(SEED + 1), 1, DECODE_PAST)
'''


def write_engine_files(settings: EngineSettings, folder: Path, base: Path | None = None) -> dict[str, Path]:
    """Write build_engine.sh, check_engine.sh and data_loader.py into `folder`.

    `base` is where they will live when run (default `folder`): their paths are relative to it.
    """
    base = Path(base or folder)
    texts = {"build_engine.sh": build_script_text(settings, base), "check_engine.sh": check_script_text(settings, base),
             "data_loader.py": data_loader_text(settings)}
    written = {}
    for name, text in texts.items():
        path = Path(folder) / name
        atomic_write_text(path, text)
        if name.endswith(".sh"):
            path.chmod(0o755)
        written[name] = path
    return written
