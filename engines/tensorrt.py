"""TensorRT engines built from the exported ONNX (DESIGN.md section 6), with auxiliary streams for CQIL branches.

Everything up to the builder call is pure and tested without TensorRT: the optimization profiles
(derived from the ONNX inputs), the builder settings, the equivalent `trtexec` command line and the
`build_engine.sh` that reproduces the build on a GPU host. `build_engine` and `TensorRTRunner`
import `tensorrt` (10.x Python API) only when called; TensorRT's libraries are not on PyPI.

Two profiles, in this order (the runner picks by the past length):
  0 prefill: batch x seq, past = 0 (min = opt = max = 0);
  1 decode:  batch x past, seq = 1.
A past of 0 is an empty tensor. TensorRT supports empty tensors (developer guide, "Working with
Empty Tensors": a zero-length dimension needs no special handling, a concatenation with an empty
input is the other input), so the prefill profile pins past to exactly 0 rather than feeding a dummy
masked-out cache slot, and decode starts at past 1. Older TensorRT wanted at least one byte behind an
empty binding (TensorRT 10 also accepts null for an empty input); the runner binds a one-element
buffer, valid for both.

Auxiliary streams: a group of p layers is p independent branches, so `max_aux_streams` defaults to
the largest group size minus one, read from the plan in the ONNX metadata.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from engines.kv_contract import ContractSpec, find_onnx, read_contract
from export.contract import output_names, past_pair
from pipeline.model.errors import CqilError

PRECISIONS = ("fp32", "fp16", "bf16")
PREFILL, DECODE = 0, 1  # optimization profile indices
Shape = tuple[int, ...]


@dataclass(frozen=True)
class ShapeRange:
    min: Shape
    opt: Shape
    max: Shape


@dataclass(frozen=True)
class EngineSettings:
    """The shape ranges and builder options of one engine build."""

    precision: str = "fp32"
    aux_streams: int | None = None  # None: the largest group size of the ONNX's plan, minus one
    opt_batch: int = 1
    max_batch: int = 1
    opt_seq: int = 128  # prefill tokens
    max_seq: int = 512
    opt_past: int = 256  # decode cache length
    max_context: int = 1024  # past + seq, the attention window the engine accepts
    workspace_mib: int | None = None
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
class BuildPlan:
    """Everything a build needs, derived from the ONNX and the settings, before TensorRT is touched."""

    onnx: Path
    engine: Path
    settings: EngineSettings
    aux_streams: int
    profiles: tuple[dict[str, ShapeRange], ...]
    spec: ContractSpec = field(compare=False)

    @property
    def layer_info(self) -> Path:
        return self.engine.with_suffix(".layers.json")

    @property
    def timing_cache(self) -> Path:
        return self.settings.timing_cache or self.engine.with_name("timing.cache")


def default_aux_streams(spec: ContractSpec, onnx_path: Path) -> int:
    if spec.plan is None:
        raise CqilError(f"'{onnx_path}' carries no cqil.plan metadata, so the group size is unknown: "
                        "pass --aux-streams N (N = largest group size - 1; 0 for the original model)")
    return spec.plan.max_group_size - 1


def derive_profiles(spec: ContractSpec, settings: EngineSettings) -> tuple[dict[str, ShapeRange], ...]:
    """Prefill (batch x seq, past 0) and decode (batch x past, seq 1) ranges for every contract input."""
    s = settings
    batch = (1, s.opt_batch, s.max_batch)
    prefill = _profile(spec, batch, seq=(1, s.opt_seq, s.max_seq), past=(0, 0, 0))
    decode = _profile(spec, batch, seq=(1, 1, 1), past=(1, s.opt_past, s.max_context - 1))
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


def plan_build(onnx: Path, engine: Path, settings: EngineSettings) -> BuildPlan:
    """Read the ONNX contract and derive the profiles and the aux-stream count."""
    onnx_path = find_onnx(onnx)
    spec = read_contract(onnx_path)
    aux = settings.aux_streams if settings.aux_streams is not None else default_aux_streams(spec, onnx_path)
    return BuildPlan(onnx_path, Path(engine), settings, aux, derive_profiles(spec, settings), spec)


# -- trtexec and build_engine.sh -------------------------------------------------------------------

def _shape_spec(profile: dict[str, ShapeRange], which: str) -> str:
    return ",".join(f"{name}:{'x'.join(map(str, getattr(r, which)))}" for name, r in profile.items())


def build_engine_command(plan: BuildPlan, base: Path | None = None) -> list[str]:
    """The trtexec invocation that builds the same engine; paths relative to `base` when given."""
    def path(p: Path) -> str:
        return str(_relative(p, base)) if base is not None else str(p)

    s = plan.settings
    command = ["trtexec", f"--onnx={path(plan.onnx)}", f"--saveEngine={path(plan.engine)}"]
    for index, profile in enumerate(plan.profiles):
        command += [f"--profile={index}", f"--minShapes={_shape_spec(profile, 'min')}",
                    f"--optShapes={_shape_spec(profile, 'opt')}", f"--maxShapes={_shape_spec(profile, 'max')}"]
    if s.precision != "fp32":
        command.append(f"--{s.precision}")
    command.append(f"--maxAuxStreams={plan.aux_streams}")
    if s.workspace_mib is not None:
        command.append(f"--memPoolSize=workspace:{s.workspace_mib}M")
    command += [f"--timingCacheFile={path(plan.timing_cache)}", "--profilingVerbosity=detailed",
                f"--exportLayerInfo={path(plan.layer_info)}", "--skipInference"]
    return command


def _relative(target: Path, base: Path) -> Path:
    import os

    return Path(os.path.relpath(Path(target).absolute(), Path(base).absolute()))


def build_script_text(plan: BuildPlan, script_dir: Path | None = None) -> str:
    """A bash script, run from anywhere, that builds the engine with trtexec relative to its own folder.

    `script_dir` is where the script will live (default: beside the ONNX).
    """
    here = Path(script_dir) if script_dir is not None else plan.onnx.parent
    command = " \\\n  ".join(shlex.quote(arg) if i else '"${TRTEXEC:-trtexec}"'
                             for i, arg in enumerate(build_engine_command(plan, base=here)))
    engine = _relative(plan.engine, here)
    return (
        "#!/usr/bin/env bash\n"
        "# Builds the TensorRT engine for this ONNX on a GPU host with TensorRT 10 (trtexec on PATH, or TRTEXEC=...).\n"
        "# Written by `cqil engine`; the same build through the TensorRT Python API, run in this folder:\n"
        f"#   cqil engine --onnx {shlex.quote(str(_relative(plan.onnx, here)))} --out {shlex.quote(str(engine))} "
        f"{' '.join(cli_options(plan))}\n"
        "set -euo pipefail\n"
        'cd "$(dirname "$0")"\n'
        f"mkdir -p {shlex.quote(str(engine.parent))}\n"
        f"{command}\n"
    )


def cli_options(plan: BuildPlan) -> list[str]:
    """`cqil engine` options that reproduce these settings."""
    s = plan.settings
    options = [f"--precision {s.precision}", f"--aux-streams {plan.aux_streams}",
               f"--opt-batch {s.opt_batch}", f"--max-batch {s.max_batch}", f"--opt-seq {s.opt_seq}",
               f"--max-seq {s.max_seq}", f"--opt-past {s.opt_past}", f"--max-context {s.max_context}"]
    if s.workspace_mib is not None:
        options.append(f"--workspace-mib {s.workspace_mib}")
    if s.timing_cache is not None:
        options.append(f"--timing-cache {shlex.quote(str(_relative(s.timing_cache, plan.onnx.parent)))}")
    return options


def write_build_script(onnx_dir: Path, plan: BuildPlan) -> Path:
    """Write build_engine.sh beside the ONNX (executable) and return its path."""
    from pipeline.model.fsutil import atomic_write_text

    script = Path(onnx_dir) / "build_engine.sh"
    atomic_write_text(script, build_script_text(plan))
    script.chmod(0o755)
    return script


# -- the build itself (needs TensorRT and a GPU) ----------------------------------------------------

def import_tensorrt():
    """The `tensorrt` module, or None where it is not installed."""
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt


def network_flags(trt) -> int:
    """Explicit batch: the only mode (and the flag deprecated) from TensorRT 10; a flag before it."""
    if int(str(trt.__version__).split(".")[0]) >= 10:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)


def configure_builder(trt, builder, plan: BuildPlan):
    """A builder config with the plan's aux streams, precision, profiles and timing cache."""
    s = plan.settings
    config = builder.create_builder_config()
    config.max_aux_streams = plan.aux_streams
    if s.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif s.precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    if s.workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, s.workspace_mib << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # full layer info for the inspector
    cache_bytes = plan.timing_cache.read_bytes() if plan.timing_cache.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), ignore_mismatch=False)
    for profile in plan.profiles:
        trt_profile = builder.create_optimization_profile()
        for name, r in profile.items():
            trt_profile.set_shape(name, r.min, r.opt, r.max)
        config.add_optimization_profile(trt_profile)
    return config


def build_engine(plan: BuildPlan, trt=None) -> Path:
    """Parse the ONNX, build and save the engine, its timing cache and the inspector's layer JSON."""
    from pipeline.model.fsutil import atomic_write_bytes, atomic_write_text

    trt = trt or import_tensorrt()
    if trt is None:
        raise CqilError("TensorRT is not installed: run build_engine.sh on a GPU host with TensorRT 10")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(plan.onnx)):  # from the file, so external weights resolve
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CqilError(f"TensorRT could not parse '{plan.onnx}': {errors or 'no detail'}")
    config = configure_builder(trt, builder, plan)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CqilError(f"TensorRT failed to build an engine from '{plan.onnx}' (see the log above)")
    engine_bytes = bytes(serialized)
    atomic_write_bytes(plan.timing_cache, bytes(config.get_timing_cache().serialize()))
    engine = trt.Runtime(logger).deserialize_cuda_engine(engine_bytes)
    layers = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    atomic_write_text(plan.layer_info, layers)
    atomic_write_bytes(plan.engine, engine_bytes)  # last: its presence means the build finished
    return plan.engine


# -- running an engine ------------------------------------------------------------------------------

class TensorRTRunner:
    """Runs a built engine on the KV-cache contract: (logits, flat presents) like CqilModel's forward.

    Inputs are torch tensors; they are moved to the GPU and cast to the engine's I/O types. Profile 0
    serves a call without past (prefill), profile 1 a call with past (decode).
    """

    def __init__(self, engine_path: Path, num_layers: int):
        import torch

        trt = import_tensorrt()
        if trt is None:
            raise CqilError("TensorRT is not installed here: the TensorRT runner needs a GPU host with TensorRT 10")
        path = Path(engine_path)
        if not path.is_file():
            raise CqilError(f"engine '{path}' does not exist: build it with `cqil engine` or build_engine.sh")
        self.trt, self.torch = trt, torch
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise CqilError(f"'{path}' is not a TensorRT engine for this TensorRT version and GPU: rebuild it")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.num_layers = num_layers
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = output_names(num_layers)
        missing = sorted(set(self.outputs) - set(names))
        if missing:
            raise CqilError(f"engine '{path}' lacks outputs {', '.join(missing[:3])}: is it for a "
                            f"{num_layers}-layer model?")
        self.profile: int | None = None

    def _torch_dtype(self, name: str):
        torch, dt = self.torch, self.trt.DataType
        table = {dt.FLOAT: torch.float32, dt.HALF: torch.float16, dt.BF16: torch.bfloat16,
                 dt.INT64: torch.int64, dt.INT32: torch.int32, dt.BOOL: torch.bool}
        return table[self.engine.get_tensor_dtype(name)]

    def __call__(self, input_ids, attention_mask, position_ids=None, past_key_values=None):
        from pipeline.model.cqil import positions_from_mask

        torch = self.torch
        past = list(past_key_values or [])
        if past and len(past) != 2 * self.num_layers:
            raise CqilError(f"past_key_values has {len(past)} tensors, the engine wants {2 * self.num_layers}")
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, input_ids.shape[1])
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        for layer in range(self.num_layers if past else 0):
            key, value = past_pair(layer)
            feeds[key], feeds[value] = past[2 * layer], past[2 * layer + 1]
        profile = DECODE if past else PREFILL
        if profile != self.profile:
            self.context.set_optimization_profile_async(profile, self.stream.cuda_stream)
            self.profile = profile
        keep = []  # device tensors alive until the launch finishes
        for name in self.inputs:
            if name in feeds:
                tensor = feeds[name]
            else:  # prefill: an empty cache [batch, kv_heads, 0, head_dim]
                dims = self.engine.get_tensor_shape(name)
                tensor = torch.empty(input_ids.shape[0], dims[1], 0, dims[3])
            tensor = tensor.to("cuda", self._torch_dtype(name)).contiguous()
            self.context.set_input_shape(name, tuple(tensor.shape))
            if tensor.numel() == 0:  # an empty binding still needs a valid address
                tensor = torch.empty(1, device="cuda", dtype=tensor.dtype)
            self.context.set_tensor_address(name, tensor.data_ptr())
            keep.append(tensor)
        results = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            results[name] = torch.empty(shape, device="cuda", dtype=self._torch_dtype(name))
            self.context.set_tensor_address(name, results[name].data_ptr())
        torch.cuda.current_stream().synchronize()  # inputs copied before the engine reads them
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise CqilError("TensorRT execution failed (see the log above)")
        self.stream.synchronize()
        presents = tuple(results[name] for name in self.outputs[1:])
        return results["logits"], presents
