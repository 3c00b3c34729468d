"""What an engine is built with: the user's options (options.py), and the profiles and aux-stream count read
from the ONNX.

Pure: nothing here imports TensorRT, so settings are made and checked on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cqil.engines.tensorrt.options import EngineOptions
from cqil.export.contract import TOKEN_INPUTS, ContractSpec, find_onnx, past_pair, read_contract
from cqil.model.errors import CqilError

PREFILL, DECODE = 0, 1  # optimization profile indices
Shape = tuple[int, ...]


@dataclass(frozen=True)
class ShapeRange:
    min: Shape
    opt: Shape
    max: Shape


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

    tokens = ranges(lambda i: (batch[i], seq[i]))
    shapes = dict(zip(TOKEN_INPUTS, (tokens, ranges(lambda i: (batch[i], past[i] + seq[i])), tokens)))
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
