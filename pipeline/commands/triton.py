"""`cqil triton`: a Triton Inference Server model repository from the exported ONNX (and engine)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from cqil.model.settings import TEXT, setting
from cqil.pipeline.commands.options import INPUT_PATH, input_file, output_dir
from cqil.pipeline.settings import add_flags, from_args


@dataclass(frozen=True)
class TritonSettings:
    """The model repository's names (`cqil triton`, the build's [package] section)."""

    name: str = setting("cqil", "model name prefix (default %(default)s)", check=TEXT)


def cmd_triton(args: argparse.Namespace) -> None:
    from cqil.engines import triton  # torch and onnx: not at `cqil --help`

    settings = from_args(TritonSettings, args)
    repo = run(settings, args.onnx, args.out, args.engine)
    io = repo.io
    plan = f"plan {io.spec.plan.describe()}" if io.spec.plan else "no plan metadata"
    print(f"{io.onnx}: {len(io.inputs)} inputs, {len(io.outputs)} outputs, {io.spec.num_layers} layers, {plan}")
    for name, what in repo.models.items():
        print(f"  {repo.path / name}: {what}")
    if args.engine is None:
        print("  no --engine: the TensorRT model was not written (build one with `cqil engine`)")
    print(f"serve with: tritonserver --model-repository {repo.path}")
    text = triton.model_names(settings.name)["text"]
    if text in repo.models:
        print(f"text in, text out: curl -X POST localhost:8000/v2/models/{text}/generate "
              """-d '{"text_input": "...", "max_tokens": 32}'""")


def run(settings: TritonSettings, onnx: Path, out: Path, engine: Path | None = None):
    """The model repository for the exported ONNX (and the TensorRT `engine`, where given) written at `out`:
    engines/triton.py's ModelRepository. What both `cqil triton` and the build's package stage run."""
    from cqil.engines.triton import write_model_repository

    return write_model_repository(onnx, out, model_name=settings.name, engine_plan=engine)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("triton", help="write a Triton model repository (ONNX Runtime, Python backend, text "
                                      "generate model, TensorRT)")
    p.add_argument("--onnx", type=INPUT_PATH, required=True, help="exported ONNX file or its directory")
    # Which folders are the repository's own is known only with --name: engines/triton.py checks that.
    p.add_argument("--out", type=output_dir(is_ours=lambda folder: True), required=True,
                   help="model repository directory (replaced as a whole; only its own model folders)")
    p.add_argument("--engine", type=input_file("build it with `cqil engine`"), default=None, help="TensorRT engine from `cqil engine` (adds <name>_trt)")
    add_flags(p, TritonSettings)
    p.set_defaults(func=cmd_triton)
