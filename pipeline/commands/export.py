"""`cqil export`: the CQIL model (or the original, with --original) as an ONNX folder."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from cqil.model.settings import one_of, setting
from cqil.pipeline.commands.options import OUTPUT_DIR, add_model_options, add_plan_options
from cqil.pipeline.settings import add_flags, from_args


@dataclass(frozen=True)
class ExportSettings:
    """How the model is written as ONNX (`cqil export`, the build's [export] section)."""

    layout: str = setting("branches", "branches (one branch per layer of a group, default) or fused (wide "
                          "operations)", check=one_of("branches", "fused"))
    dtype: str = setting("fp32", "fp32 (default) or fp16", check=one_of("fp32", "fp16"))
    external_data: bool = setting(False, "always put the weights in model.onnx.data (default: past 64 MiB)",
                                  toml=False)


def cmd_export(args: argparse.Namespace) -> None:
    from cqil.export.writer import DTYPES
    from cqil.pipeline.plan_choice import load_model_and_plan

    settings = from_args(ExportSettings, args)
    loaded, plan = load_model_and_plan(args, dtype=str(DTYPES[settings.dtype]).removeprefix("torch."))
    result = run(settings, loaded, plan, args.out, source={"name": loaded.name, "path": str(loaded.path)})
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    print(f"{result.path}: {loaded.name}, {plan.describe()}, layout {result.layout}, {result.dtype}")
    data = " (weights in model.onnx.data)" if result.external_data else ""
    print(f"{result.nodes} nodes, {result.size_bytes / 1e6:.1f} MB{data}; "
          f"{result.seconds:.1f} s, peak memory {result.peak_rss_mb:.0f} MB")
    if result.structure is not None:
        print(result.structure.describe())


def run(settings: ExportSettings, loaded, plan, out, source: dict):
    """The loaded model under `plan` as an ONNX folder at `out`: what `cqil export` and the build's export
    stage run (`source` is what the ONNX records of the model it came from)."""
    from cqil.export.writer import export_model
    from cqil.model.cqil import CqilModel

    return export_model(CqilModel(loaded.model, plan), out, settings.layout, settings.dtype, source=source,
                        tokenizer=loaded.tokenizer, external_data=True if settings.external_data else None)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="ONNX with explicit parallel branches per group and a KV cache")
    add_model_options(p)
    add_plan_options(p)
    p.add_argument("--original", action="store_true",
                   help="export the original model (every layer alone): the reference for cqil bench")
    p.add_argument("--out", type=OUTPUT_DIR, default="onnx", help="output directory (default %(default)s)")
    add_flags(p, ExportSettings)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_export)
