"""`cqil engine`: a TensorRT engine from the ONNX, or its build script where TensorRT is absent."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cqil.engines.tensorrt.options import EngineOptions
from cqil.pipeline.commands.options import INPUT_PATH, OUTPUT_FILE
from cqil.pipeline.settings import add_flags, from_args

if TYPE_CHECKING:  # its module reads the ONNX contract, which loads torch: not at `cqil --help`
    from cqil.engines.tensorrt.settings import EngineSettings


@dataclass(frozen=True)
class EngineResult:
    """What `run` resolved and wrote: the settings (profiles, aux streams), the GPU-host scripts, and whether
    TensorRT was here to build the engine."""

    settings: EngineSettings
    scripts: dict[str, Path]
    built: bool


def cmd_engine(args: argparse.Namespace) -> None:
    result = run(from_args(EngineOptions, args), args.onnx, args.out)
    settings, written = result.settings, result.scripts
    spec = settings.spec
    groups = f"plan {spec.plan.describe()}" if spec.plan else "no plan metadata"
    print(f"{settings.onnx}: {spec.num_layers} layers, cache {spec.kv_dtype}, {groups}")
    print(f"profiles: prefill {_describe(settings.profiles[0])}; decode {_describe(settings.profiles[1])}")
    print(f"max_aux_streams {settings.aux_streams}, precision {settings.options.precision}")
    print(f"wrote {written['build_engine.sh']} (polygraphy convert), {written['check_engine.sh']} "
          f"(polygraphy run --onnxrt --trt) and {written['data_loader.py']} for a GPU host")
    if not result.built:
        print(f"TensorRT is not installed here: the engine was NOT built and {args.out} was not written. "
              f"Run {written['build_engine.sh']} on a GPU host with TensorRT 10.")
        return
    print(f"built {settings.engine}; layer information {settings.layer_info}; timing cache {settings.timing_cache}")


def run(options: EngineOptions, onnx: Path, engine: Path, scripts: Path | None = None,
        final: Path | None = None) -> EngineResult:
    """Resolve `options` against the ONNX, write build_engine.sh, check_engine.sh and data_loader.py into
    `scripts` (default: beside the ONNX), and build `engine` where TensorRT imports. `final`: the folder the
    engine will be moved to, which the scripts name instead (the build's stage directory). What both
    `cqil engine` and the build's engines stage run."""
    from cqil.engines.tensorrt.build import build_engine, import_tensorrt
    from cqil.engines.tensorrt.script import write_engine_files
    from cqil.engines.tensorrt.settings import engine_settings

    settings = engine_settings(onnx, engine, options)
    named = settings if final is None else dataclasses.replace(settings, engine=Path(final) / settings.engine.name)
    written = write_engine_files(named, scripts or settings.onnx.parent, final)
    built = import_tensorrt() is not None
    if built:
        build_engine(settings)
    return EngineResult(settings, written, built)


def _describe(profile) -> str:
    ids, past = profile["input_ids"], profile["past_key_values.0.key"]
    return (f"input_ids {ids.min}..{ids.max} (opt {ids.opt}), "
            f"past {past.min[2]}..{past.max[2]} (opt {past.opt[2]})")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("engine", help="build a TensorRT engine from the ONNX with Polygraphy; always writes "
                                      "build_engine.sh, check_engine.sh and data_loader.py beside it")
    p.add_argument("--onnx", type=INPUT_PATH, required=True, help="exported ONNX file or its directory")
    p.add_argument("--out", type=OUTPUT_FILE, required=True, help="engine file to write, e.g. trt/model.plan")
    add_flags(p, EngineOptions)
    p.set_defaults(func=cmd_engine)
