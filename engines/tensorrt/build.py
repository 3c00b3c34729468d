"""The engine build: Polygraphy's loader chain parse -> configure -> build -> save, and the inspector's layers.

TensorRT and Polygraphy are imported where a config is made or a loader called (TensorRT's libraries
are not on PyPI, so most machines have neither).
"""

from __future__ import annotations

import os
from pathlib import Path

from cqil.engines.tensorrt.settings import EngineSettings
from cqil.model.errors import CqilError
from cqil.model.fsutil import atomic_write_text


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
