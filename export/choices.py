"""The export's choices, spelled once: what `--layout`, `--target` and `--precision` accept.

Torch-free on purpose: the settings dataclasses (and so `cqil --help`) check their values against these
tuples without loading the exporter (export/writer.py, export/precision.py import torch).
"""

from __future__ import annotations

LAYOUTS = ("branches", "fused")  # one branch per layer of a group, or wide operations (export/layouts.py)
TARGETS = ("portable", "onnxruntime")  # standard operators, or ONNX Runtime's fused ones (export/ort_target.py)
PRECISIONS = ("fp32", "fp16", "int8", "int4")  # traced dtypes, then int8/int4 weight-only (export/precision.py)
