"""Triton Python-backend model: the exported cqil decoder run by ONNX Runtime on CPU.

`cqil triton` copies this file as `<model>/1/model.py`, beside the `model.onnx` it runs; it runs
inside Triton's Python backend, which provides `triton_python_backend_utils`. The model exposes the
ONNX graph's own inputs and outputs (DESIGN.md section 4), so a client sends the same tensors to it
as to the ONNX Runtime and TensorRT models of the repository.

Tensors cross the backend boundary through DLPack, not `as_numpy()` / `Tensor(name, array)`: those
go through the stub's compiled numpy bindings, which misread arrays when the stub was built against
another numpy ABI (the stub shipped in nvidia-pytriton 0.7 returns garbage under numpy 2). DLPack
describes the buffer itself and works with either.
"""

import ctypes
import os

import numpy as np
import onnxruntime
import triton_python_backend_utils as pb_utils

# The backend renames a capsule it consumed "used_dlpack" instead of DLPack's "used_dltensor", so
# numpy's capsule destructor would print a ValueError traceback for every output tensor. Renaming it
# as the protocol says tells numpy the backend owns (and will release) the buffer.
_USED_CAPSULE = b"used_dltensor"
_set_capsule_name = ctypes.pythonapi.PyCapsule_SetName
_set_capsule_name.argtypes = (ctypes.py_object, ctypes.c_char_p)


def output_tensor(name, array):
    capsule = array.__dlpack__()
    tensor = pb_utils.Tensor.from_dlpack(name, capsule)
    _set_capsule_name(capsule, _USED_CAPSULE)
    return tensor


class TritonPythonModel:
    def initialize(self, args):
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.input_names = [value.name for value in self.session.get_inputs()]
        self.output_names = [value.name for value in self.session.get_outputs()]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                feed = {name: np.from_dlpack(pb_utils.get_input_tensor_by_name(request, name))
                        for name in self.input_names}
                results = self.session.run(self.output_names, feed)
                outputs = [output_tensor(name, value) for name, value in zip(self.output_names, results)]
                responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
            except Exception as exc:  # noqa: BLE001 -- one bad request must not fail the others in the batch
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"{type(exc).__name__}: {exc}")))
        return responses
