"""`cqil export`: the CQIL model (or the original, with --original) as an ONNX folder."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from cqil.export.choices import LAYOUTS, PRECISIONS, TARGETS
from cqil.export.precision import (
    DEFAULT_QUANTIZATION,
    INT4_METHODS,
    MATMUL_LIST,
    MATMUL_NAMES,
    TRACE_DTYPES,
    Quantization,
    check_precision,
    check_target_precision,
    parse_matmul_names,
)
from cqil.model.errors import CqilError
from cqil.model.settings import NON_NEGATIVE, POSITIVE, check_fields, one_of, setting
from cqil.pipeline.commands.options import OUTPUT_DIR, add_model_options, add_plan_options
from cqil.pipeline.plan_choice import load_model_and_plan
from cqil.pipeline.settings import add_flags, from_args


@dataclass(frozen=True)
class ExportSettings:
    """How the model is written as ONNX (`cqil export`, the build's [export] section)."""

    layout: str = setting("branches", "branches (one branch per layer of a group, default) or fused (wide "
                          "operations)", check=one_of(*LAYOUTS))
    target: str = setting("portable", "portable (standard operators: TensorRT and any runtime; default) or "
                          "onnxruntime (its fused GroupQueryAttention, SkipSimplifiedLayerNormalization, MatMulNBits: "
                          "the GenAI model builder's graph with the CQIL groups)",
                          check=one_of(*TARGETS))
    precision: str = setting("fp32", "fp32 (default), fp16, or int8 / int4 weights (MatMulNBits)",
                             check=one_of(*PRECISIONS), toml_aliases=("dtype",))
    block_size: int = setting(DEFAULT_QUANTIZATION.block_size, "int8/int4: weights quantized in blocks of this many "
                              "along K (default %(default)s)", check=POSITIVE)
    int4_method: str = setting(DEFAULT_QUANTIZATION.method, "int4: rtn (round to nearest, symmetric: the GenAI model "
                               "builder's; default %(default)s) or hqq (ONNX Runtime's half-quadratic quantizer, "
                               "asymmetric: lower KL, minutes longer)", check=one_of(*INT4_METHODS))
    int8_matmuls: str = setting(",".join(DEFAULT_QUANTIZATION.int8_matmuls), "int4: the matmuls kept 8-bit, "
                                f"comma-separated ({', '.join(MATMUL_NAMES)}; '' for none; default %(default)s)",
                                check=MATMUL_LIST)
    accuracy_level: int = setting(DEFAULT_QUANTIZATION.accuracy_level, "int8/int4: MatMulNBits accuracy_level: 4 = "
                                  "int8 activations, the fast CPU kernels (default); 0 = fp32 activations",
                                  check=NON_NEGATIVE)
    external_data: bool = setting(False, "always put the weights in model.onnx.data (default: past 64 MiB)",
                                  toml=False)

    def __post_init__(self) -> None:
        check_fields(self)
        check_precision(self.precision, self.quantization)
        check_target_precision(self.target, self.precision)

    @property
    def quantization(self) -> Quantization:
        return Quantization(method=self.int4_method, block_size=self.block_size, accuracy_level=self.accuracy_level,
                            int8_matmuls=parse_matmul_names(self.int8_matmuls))


def cmd_export(args: argparse.Namespace) -> None:
    from cqil.export.writer import check_options

    if args.dtype is not None:
        raise CqilError(f"--dtype is now --precision (fp32, fp16, int8, int4): use --precision {args.dtype}")
    settings = from_args(ExportSettings, args)
    check_options(settings.layout, settings.precision, settings.quantization, settings.target)
    loaded, plan = load_model_and_plan(args, dtype=TRACE_DTYPES[settings.precision])
    result = run(settings, loaded, plan, args.out, source={"name": loaded.name, "path": str(loaded.path)})
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    print(f"{result.path}: {loaded.name}, {plan.describe()}, layout {result.layout}, {result.precision}")
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

    return export_model(CqilModel(loaded.model, plan), out, settings.layout, settings.precision, source=source,
                        tokenizer=loaded.tokenizer, external_data=True if settings.external_data else None,
                        quantization=settings.quantization, target=settings.target)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="ONNX with explicit parallel branches per group and a KV cache")
    add_model_options(p)
    add_plan_options(p)
    p.add_argument("--original", action="store_true",
                   help="export the original model (every layer alone): the reference for cqil bench")
    p.add_argument("--out", type=OUTPUT_DIR, default="onnx", help="output directory (default %(default)s)")
    add_flags(p, ExportSettings)
    p.add_argument("--dtype", help=argparse.SUPPRESS)  # the old spelling of --precision: refused with a hint
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_export)
