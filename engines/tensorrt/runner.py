"""Running a built engine: Polygraphy's TrtRunner under `ContractRunner`, so a TensorRT call is checked
exactly as an ONNX Runtime call is. Polygraphy is imported when a runner is made (it needs TensorRT).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from cqil.engines.runner import ContractRunner
from cqil.engines.tensorrt.build import import_tensorrt
from cqil.engines.tensorrt.settings import DECODE, PREFILL
from cqil.export.contract import ContractSpec, past_pair
from cqil.model.errors import CqilError


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
