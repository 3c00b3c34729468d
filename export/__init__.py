"""torch.export -> ONNX for CQIL models (DESIGN.md section 4)."""
