"""ONNX Runtime engine: a session factory and a runner that speaks the KV-cache contract.

The runner is a `ContractRunner` (engines/runner.py): called like `CqilModel`, its feed checked once
by the base class, as the TensorRT runner's is.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from cqil.engines.runner import ContractRunner
from cqil.export.contract import find_onnx, read_contract
from cqil.model.errors import CqilError

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
OPT_LEVELS = ("disable", "basic", "extended", "all")


def available_providers(wanted: Sequence[str] | None = None) -> list[str]:
    """The installed execution providers, in our order of preference (or the order asked for)."""
    import onnxruntime as ort

    installed = set(ort.get_available_providers())
    order = list(wanted) if wanted else list(PREFERRED_PROVIDERS)
    missing = [p for p in order if p not in installed] if wanted else []
    if missing:
        raise CqilError(f"execution provider(s) {', '.join(missing)} not installed here; "
                        f"available: {', '.join(sorted(installed))}")
    return [p for p in order if p in installed]


def create_session(onnx_path: Path, providers: Sequence[str] | None = None, threads: int | None = None,
                   opt_level: str = "all", optimized_model: Path | None = None, spin: bool = True):
    """An InferenceSession with explicit threads and graph optimization level.

    `optimized_model` saves the graph after ONNX Runtime's optimizations (what it really runs).
    `spin=False` stops the intra-op threads from busy-waiting after a run: with several sessions
    timed in turn in one process (cqil bench), a spinning pool steals the cores of the next one.
    """
    import onnxruntime as ort

    if opt_level not in OPT_LEVELS:
        raise CqilError(f"graph optimization level '{opt_level}' is not one of {', '.join(OPT_LEVELS)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opt_level]
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimized_model is not None:
        Path(optimized_model).parent.mkdir(parents=True, exist_ok=True)
        options.optimized_model_filepath = str(optimized_model)
    options.log_severity_level = 3
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(onnx_path), sess_options=options,
                                    providers=available_providers(providers))
    except CqilError:
        raise
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
        raise CqilError(f"ONNX Runtime could not load '{onnx_path}' ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200]}): export it again with `cqil export`") from exc


class OrtRunner(ContractRunner):
    """Runs an exported decoder with ONNX Runtime; call it like `CqilModel` (checks in ContractRunner)."""

    def __init__(self, onnx: Path, providers: Sequence[str] | None = None, threads: int | None = None,
                 opt_level: str = "all", optimized_model: Path | None = None, spin: bool = True):
        path = find_onnx(Path(onnx))
        super().__init__(path, read_contract(path))
        self.session = create_session(self.path, providers, threads, opt_level, optimized_model, spin)

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return dict(zip(self.outputs, self.session.run(self.outputs, feeds)))
        except Exception as exc:  # ORT's own error types; their messages span lines
            raise CqilError(f"ONNX Runtime failed on '{self.path}' ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200]})") from exc
