"""TensorRT engines built from the exported ONNX with Polygraphy's loaders (DESIGN.md section 6).

The build is Polygraphy's lazy loader chain, composed as its own tools compose it:
`SaveEngine(EngineFromNetwork(NetworkFromOnnxPath(onnx), config=CreateConfig(...)))`, nothing run
until the last loader is called. `NetworkFromOnnxPath` parses with `parse_from_file`, so weights
stored as external data resolve beside the ONNX. Running an engine is Polygraphy's `TrtRunner`
under our `ContractRunner`, so a TensorRT call is checked exactly as an ONNX Runtime call is.

Everything up to the builder call is pure and tested here without TensorRT (its libraries are not on
PyPI): the engine settings (profiles from the ONNX inputs, aux streams from the plan), the loader
objects and their arguments, and the scripts written beside the ONNX for a GPU host —
`build_engine.sh` (`polygraphy convert` with the same settings), `check_engine.sh` (`polygraphy run
--onnxrt --trt`) and `data_loader.py` (its feeds).

Two optimization profiles, in this order (the runner picks by the past length):
  0 prefill: batch x seq, past = 0 (min = opt = max = 0; TensorRT takes empty tensors);
  1 decode:  batch x past, seq = 1.
Auxiliary streams: a group of p layers is p independent branches, so `max_aux_streams` defaults to
the largest group size minus one, read from the plan in the ONNX metadata.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cqil.engines.runner import ContractRunner
from cqil.export.contract import ContractSpec, find_onnx, past_pair, read_contract
from cqil.model.errors import CqilError
from cqil.model.settings import NON_NEGATIVE, POSITIVE, one_of, setting

PRECISIONS = ("fp32", "fp16", "bf16")
PREFILL, DECODE = 0, 1  # optimization profile indices
Shape = tuple[int, ...]


@dataclass(frozen=True)
class ShapeRange:
    min: Shape
    opt: Shape
    max: Shape


@dataclass(frozen=True)
class EngineOptions:
    """What a user asks of an engine: precision, shape ranges, builder limits (`cqil engine` options)."""

    precision: str = setting("fp32", "engine precision", check=one_of(*PRECISIONS))
    aux_streams: int | None = setting(None, "max_aux_streams (default: largest group size - 1, from the ONNX plan "
                                      "metadata)", check=NON_NEGATIVE, toml=False)
    opt_batch: int = setting(1, "rows the engine is tuned for", check=POSITIVE)
    max_batch: int = setting(1, "most rows", check=POSITIVE)
    opt_seq: int = setting(128, "prefill tokens the engine is tuned for", check=POSITIVE)
    max_seq: int = setting(512, "most prefill tokens", check=POSITIVE)
    opt_past: int = setting(256, "decode cache length the engine is tuned for", check=POSITIVE)
    max_context: int = setting(1024, "most past + new tokens: the attention window the engine accepts",
                               check=POSITIVE)
    workspace_mib: int | None = setting(None, "builder workspace limit", check=POSITIVE, toml=False)
    timing_cache: Path | None = None  # None: timing.cache beside the engine

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise CqilError(f"--precision {self.precision} is not one of {', '.join(PRECISIONS)}")
        if self.aux_streams is not None and self.aux_streams < 0:
            raise CqilError(f"--aux-streams {self.aux_streams} must be 0 or more")
        for low, high, what in ((self.opt_batch, self.max_batch, "batch"), (self.opt_seq, self.max_seq, "seq"),
                                (self.opt_past, self.max_context - 1, "past")):
            if not 1 <= low <= high:
                raise CqilError(f"{what} range: need 1 <= opt {low} <= max {high} "
                                "(check --opt-/--max- options; max past is --max-context minus 1)")
        if self.max_seq > self.max_context:
            raise CqilError(f"--max-seq {self.max_seq} exceeds --max-context {self.max_context}")


@dataclass(frozen=True)
class EngineSettings:
    """One engine's build settings, resolved against its ONNX before TensorRT is touched."""

    onnx: Path
    engine: Path
    options: EngineOptions
    aux_streams: int
    profiles: tuple[dict[str, ShapeRange], ...]
    spec: ContractSpec = field(compare=False)

    @property
    def layer_info(self) -> Path:
        return self.engine.with_suffix(".layers.json")

    @property
    def timing_cache(self) -> Path:
        return self.options.timing_cache or self.engine.with_name("timing.cache")


def default_aux_streams(spec: ContractSpec, onnx_path: Path) -> int:
    if spec.plan is None:
        raise CqilError(f"'{onnx_path}' carries no cqil.plan metadata, so the group size is unknown: "
                        "pass --aux-streams N (N = largest group size - 1; 0 for the original model)")
    return spec.plan.max_group_size - 1


def derive_profiles(spec: ContractSpec, options: EngineOptions) -> tuple[dict[str, ShapeRange], ...]:
    """Prefill (batch x seq, past 0) and decode (batch x past, seq 1) ranges for every contract input."""
    o = options
    batch = (1, o.opt_batch, o.max_batch)
    prefill = _profile(spec, batch, seq=(1, o.opt_seq, o.max_seq), past=(0, 0, 0))
    decode = _profile(spec, batch, seq=(1, 1, 1), past=(1, o.opt_past, o.max_context - 1))
    return prefill, decode


def _profile(spec: ContractSpec, batch: Shape, seq: Shape, past: Shape) -> dict[str, ShapeRange]:
    def ranges(make) -> ShapeRange:
        return ShapeRange(*(make(i) for i in range(3)))

    shapes = {
        "input_ids": ranges(lambda i: (batch[i], seq[i])),
        "attention_mask": ranges(lambda i: (batch[i], past[i] + seq[i])),
        "position_ids": ranges(lambda i: (batch[i], seq[i])),
    }
    cache = ranges(lambda i: (batch[i], spec.kv_heads, past[i], spec.head_dim))
    for layer in range(spec.num_layers):
        for name in past_pair(layer):
            shapes[name] = cache
    return {name: shapes[name] for name in spec.inputs}


def engine_settings(onnx: Path, engine: Path, options: EngineOptions) -> EngineSettings:
    """Read the ONNX contract and derive the profiles and the aux-stream count."""
    onnx_path = find_onnx(onnx)
    spec = read_contract(onnx_path)
    aux = options.aux_streams if options.aux_streams is not None else default_aux_streams(spec, onnx_path)
    return EngineSettings(onnx_path, Path(engine), options, aux, derive_profiles(spec, options), spec)


# -- Polygraphy's loaders (TensorRT is imported only when a config is made or a loader called) ----

def import_tensorrt():
    """The `tensorrt` module, or None where it is not installed."""
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt


def trt_profiles(settings: EngineSettings) -> list:
    """The settings' shape ranges as Polygraphy `Profile`s, in profile order."""
    from polygraphy.backend.trt import Profile

    profiles = []
    for shapes in settings.profiles:
        profile = Profile()
        for name, r in shapes.items():
            profile.add(name, min=r.min, opt=r.opt, max=r.max)
        profiles.append(profile)
    return profiles


def create_config(settings: EngineSettings):
    """Polygraphy's `CreateConfig` loader for these settings (needs TensorRT's enums: call it on a TensorRT host)."""
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig

    options = settings.options
    pools = None if options.workspace_mib is None else {trt.MemoryPoolType.WORKSPACE: options.workspace_mib << 20}
    return CreateConfig(fp16=options.precision == "fp16", bf16=options.precision == "bf16",
                        profiles=trt_profiles(settings), max_aux_streams=settings.aux_streams,
                        load_timing_cache=str(settings.timing_cache), memory_pool_limits=pools,
                        profiling_verbosity=trt.ProfilingVerbosity.DETAILED)  # full layer info for the inspector


def engine_loader(settings: EngineSettings, path: Path):
    """The lazy chain parse -> configure -> build (timing cache saved) -> save to `path`; calling it builds."""
    from polygraphy.backend.trt import (
        EngineFromNetwork,
        NetworkFromOnnxPath,
        SaveEngine,
    )

    network = NetworkFromOnnxPath(str(settings.onnx))  # parse_from_file: external weights resolve
    build = EngineFromNetwork(network, config=create_config(settings), save_timing_cache=str(settings.timing_cache))
    return SaveEngine(build, path=str(path))


def build_engine(settings: EngineSettings) -> Path:
    """Build and save the engine, its timing cache and the inspector's layer JSON (needs TensorRT and a GPU).

    The engine is saved under a `.partial` name and renamed last, so its presence means the build finished.
    """
    from cqil.model.fsutil import atomic_write_text
    from polygraphy.exception import PolygraphyException

    trt = import_tensorrt()
    if trt is None:
        raise CqilError("TensorRT is not installed: run build_engine.sh on a GPU host with TensorRT 10")
    partial = settings.engine.with_name(settings.engine.name + ".partial")
    settings.engine.parent.mkdir(parents=True, exist_ok=True)
    try:
        engine = engine_loader(settings, partial)()
        layers = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
        atomic_write_text(settings.layer_info, layers)
        os.replace(partial, settings.engine)
    except PolygraphyException as exc:
        raise CqilError(f"TensorRT could not build an engine from '{settings.onnx}' "
                        f"({str(exc).strip().splitlines()[0][:200]}): see the log above") from exc
    finally:
        partial.unlink(missing_ok=True)
    return settings.engine


# -- command lines and files for a GPU host -------------------------------------------------------------

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
    from cqil.engines.tolerances import DEFAULT_THRESHOLDS

    fp32 = settings.options.precision == "fp32" and settings.spec.kv_dtype == "FLOAT"
    limits = DEFAULT_THRESHOLDS["FLOAT" if fp32 else "FLOAT16"]
    tolerances = ["--atol", f"{limits.present_atol:g}", f"logits:{limits.logits_atol:g}",
                  "--rtol", f"{limits.present_rtol:g}", f"logits:{limits.logits_rtol:g}"]
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
POSITION_IDS = {"position_ids" in spec.inputs}  # whether the graph takes position_ids
SEED = {seed}


def _feed(rng, seq, past):
    ids = rng.integers(0, VOCAB, size=(BATCH, seq), dtype=np.int64)
    mask = np.ones((BATCH, past + seq), dtype=np.int64)
    if BATCH > 1:
        mask[1, : (past + seq) // 4] = 0  # left padding
    feed = {{"input_ids": ids, "attention_mask": mask}}
    if POSITION_IDS:
        feed["position_ids"] = np.maximum(mask.cumsum(-1) - 1, 0)[:, past:]
    shape = (BATCH, KV_HEADS, past, HEAD_DIM)
    for layer in range(LAYERS):
        for kind in ("key", "value"):
            feed[f"past_key_values.{{layer}}.{{kind}}"] = rng.standard_normal(shape).astype(CACHE_DTYPE)
    return feed


def load_prefill():
    yield _feed(np.random.default_rng(SEED), PREFILL_SEQ, 0)


def load_decode():
    yield _feed(np.random.default_rng(SEED + 1), 1, DECODE_PAST)
'''


def write_engine_files(settings: EngineSettings, folder: Path, base: Path | None = None) -> dict[str, Path]:
    """Write build_engine.sh, check_engine.sh and data_loader.py into `folder`.

    `base` is where they will live when run (default `folder`): their paths are relative to it.
    """
    from cqil.model.fsutil import atomic_write_text

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


# -- running an engine ------------------------------------------------------------------------------

class TensorRTRunner(ContractRunner):
    """Runs a built engine through Polygraphy's TrtRunner; called like `CqilModel`, checked by ContractRunner.

    Profile 0 serves a call without past (prefill), profile 1 a call with past (decode).
    """

    def __init__(self, engine: Path, spec: ContractSpec):
        if import_tensorrt() is None:
            raise CqilError("TensorRT is not installed here: the TensorRT runner needs a GPU host with TensorRT 10")
        path = Path(engine)
        if not path.is_file():
            raise CqilError(f"engine '{path}' does not exist: build it with `cqil engine` or build_engine.sh")
        super().__init__(path, spec)
        from polygraphy.backend.trt import EngineFromPath, TrtRunner
        from polygraphy.exception import PolygraphyException

        self.runner = TrtRunner(EngineFromPath(str(path)))
        try:
            self.runner.activate()
        except PolygraphyException as exc:
            raise CqilError(f"'{path}' did not load as a TensorRT engine for this TensorRT version and GPU "
                            f"({str(exc).strip().splitlines()[0][:200]}): rebuild it") from exc
        self.profile: int | None = None

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        profile = DECODE if feeds[past_pair(0)[0]].shape[2] else PREFILL
        if profile != self.profile:
            self.runner.set_profile(profile)
            self.profile = profile
        outputs = self.runner.infer(feeds)
        missing = [name for name in self.outputs if name not in outputs]
        if missing:
            raise CqilError(f"engine '{self.path}' lacks outputs {', '.join(missing[:3])}: was it built from "
                            f"this {self.spec.num_layers}-layer ONNX?")
        return {name: np.array(outputs[name]) for name in self.outputs}  # copies: TrtRunner reuses its buffers

    def close(self) -> None:
        self.runner.deactivate()
