"""`cqil --help` (every command's parser) loads none of the heavy libraries: they stay lazy for this
(docs/ecosystem.md, "What stays lazy")."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "transformers", "numpy", "onnx", "onnxruntime", "peft", "matplotlib", "tensorrt", "polygraphy",
         "onnxruntime_genai", "optimum", "tritonclient")


def test_every_command_parser_loads_no_heavy_library():
    code = ("import sys; from cqil.pipeline.cli import build_parser; build_parser(); "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == ""
