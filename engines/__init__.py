"""Runtimes for exported CQIL models: ONNX Runtime, TensorRT, PyTorch CUDA streams."""
