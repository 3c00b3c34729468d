"""`cqil export`: write a self-describing ONNX folder for a CQIL model (or the original model).

    out/model.onnx (+ model.onnx.data when large)   the graph of DESIGN.md section 4
    out/config.json, generation_config.json          the HF config, with the plan under `cqil_plan`
    out/tokenizer files                              so the folder alone can serve text (transformers 4 and 5)
    out/genai_config.json                            so ONNX Runtime GenAI's Generator runs the folder

Precisions (`export.precision`): fp32 and fp16 trace in that dtype; int8 and int4 trace in fp32 and
then quantize the weights (MatMulNBits), so `cqil.dtype` (activations and cache) stays fp32 for them.

The folder is written through a temporary sibling and renamed into place, so a failed export leaves
nothing behind; the same model, plan, layout and dtype give the same bytes (no timestamps, no paths
of the tool in the graph). Time, peak memory and size are returned, not written, for that reason.
"""

from __future__ import annotations

import copy
import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from cqil.export import contract
from cqil.export.check import StructureReport, check_branch_structure
from cqil.export.choices import LAYOUTS, TARGETS
from cqil.export.genai_config import write_genai_config
from cqil.export.precision import (
    DEFAULT_QUANTIZATION,
    TRACE_DTYPES,
    Quantization,
    builder_quantization,
    check_precision,
    check_target_precision,
    is_quantized,
)
from cqil.export.tokenizer_files import write_tokenizer_files
from cqil.model.cqil import CqilModel
from cqil.model.errors import CqilError
from cqil.model.fsutil import atomic_dir, check_output_dir
from cqil.model.plan import CONFIG_KEY
from tqdm import tqdm

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
# Weights past 64 MiB go to model.onnx.data. Protobuf refuses messages over 2 GiB, and writing one
# large message is costly: the 540 MB SmolLM2 export peaked at 4.2 GB resident inline, 1.1 GB external.
EXTERNAL_DATA_THRESHOLD = 64 << 20


@dataclass
class ExportResult:
    path: Path  # the model.onnx file
    layout: str
    precision: str
    seconds: float
    peak_rss_mb: float  # peak resident memory of this process so far (resource.getrusage)
    size_bytes: int  # model.onnx plus its external data
    external_data: bool
    nodes: int
    structure: StructureReport | None  # branch layout only

    def to_dict(self) -> dict:
        return {
            "path": str(self.path), "layout": self.layout, "precision": self.precision,
            "seconds": round(self.seconds, 2), "peak_rss_mb": round(self.peak_rss_mb, 1),
            "size_bytes": self.size_bytes, "size_mb": round(self.size_bytes / 1e6, 1),
            "external_data": self.external_data, "nodes": self.nodes,
            "structure": self.structure.describe() if self.structure else None,
        }


def check_options(layout: str, precision: str, quantization: Quantization = DEFAULT_QUANTIZATION,
                  target: str = "portable") -> None:
    check_precision(precision, quantization)
    if target not in TARGETS:
        raise CqilError(f"unknown target '{target}': use --target {' or '.join(TARGETS)}")
    check_target_precision(target, precision)
    if layout not in LAYOUTS:
        raise CqilError(f"unknown layout '{layout}': use --layout {' or '.join(LAYOUTS)}")


def check_writable(out: Path) -> None:
    """Fail before the (minute-long) export if `out` cannot become a folder we write (fsutil rules)."""
    check_output_dir(Path(out), "--out")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _in_dtype(model: CqilModel, dtype: torch.dtype) -> CqilModel:
    """The model in `dtype`; a cast copy only when it differs (callers may load it in dtype already)."""
    if model.dtype == dtype:
        return model
    return CqilModel(copy.deepcopy(model.hf).to(dtype), model.plan)


def _layout_module(model: CqilModel, layout: str) -> torch.nn.Module:
    from cqil.export.layouts import layout_model

    return contract.ContractModule(layout_model(model, layout))


def _metadata(model: CqilModel, layout: str, precision: str, source: dict, target: str,
              quantization: Quantization) -> dict[str, str]:
    from cqil.model.version import __version__

    kv_shape = {"layers": model.num_layers, "kv_heads": model.num_kv_heads, "head_dim": model.head_dim}
    return {
        contract.PLAN_KEY: json.dumps(model.plan.to_dict(), sort_keys=True),
        contract.LAYOUT_KEY: layout,
        contract.DTYPE_KEY: "fp16" if precision == "fp16" else "fp32",
        contract.PRECISION_KEY: precision,
        contract.SOURCE_KEY: json.dumps({key: value for key, value in source.items() if key != "path"}, sort_keys=True),
        contract.VERSION_KEY: f"cqil-pipeline {__version__}",
        contract.KV_SHAPE_KEY: json.dumps(kv_shape, sort_keys=True),
        contract.TARGET_KEY: target,
        **({contract.QUANTIZATION_KEY: quantization.to_json()} if is_quantized(precision) else {}),
    }


def _write_source_file(folder: Path, source: dict) -> None:
    """contract.SOURCE_FILE: the source record with its path absolute and resolved (not in the ONNX bytes)."""
    if source.get("path"):
        record = {**source, "path": str(Path(source["path"]).expanduser().resolve())}
        (folder / contract.SOURCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _write_side_files(folder: Path, model: CqilModel, precision: str, tokenizer, genai: bool = True) -> None:
    config = copy.deepcopy(model.hf.config)
    setattr(config, CONFIG_KEY, model.plan.to_dict())
    config.dtype = getattr(torch, TRACE_DTYPES[precision])
    config.save_pretrained(folder)
    generation = getattr(model.hf, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)
    if genai:  # the onnxruntime target keeps the model builder's own genai_config.json
        write_genai_config(folder, config, generation, MODEL_FILE)
    if tokenizer is not None:
        write_tokenizer_files(tokenizer, folder)


def _quantized(ir_model, precision: str, quantization: Quantization):
    """`ir_model` with its constant-weight MatMuls quantized by ONNX Runtime (export.precision)."""
    import onnx_ir as ir
    from cqil.export.precision import constant_weights, quantize

    constant_weights(ir_model.graph)
    proto = ir.to_proto(ir_model)
    del ir_model
    return ir.from_proto(quantize(proto, precision, quantization))


def _loads_in_onnxruntime(path: Path) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _export_onnxruntime(model: CqilModel, out: Path, layout: str, precision: str, quantization: Quantization,
                        source: dict,
                        tokenizer) -> ExportResult:
    """The onnxruntime target: the model builder writes the folder, then labels, metadata, side files, checks."""
    from cqil.export import ort_target

    start = time.perf_counter()
    with atomic_dir(out) as tmp:
        ort_target.build(model, tmp, precision, quantization.block_size, tokenizer, layout)
        recipe = builder_quantization(quantization.block_size)
        nodes = ort_target.finish(tmp, model.plan, _metadata(model, layout, precision, source, "onnxruntime", recipe),
                                   model.head_dim)
        _write_side_files(tmp, model, precision, tokenizer, genai=False)
        _write_source_file(tmp, source)
        _loads_in_onnxruntime(tmp / MODEL_FILE)  # onnx.checker knows no ORT operators (SimplifiedLayerNormalization)
        structure = None
        if layout == "branches":
            structure = check_branch_structure(tmp / MODEL_FILE)
            if not structure.ok:
                raise CqilError(f"the exported graph lost its branches: {structure.describe()}")
        size = sum(f.stat().st_size for f in (tmp / MODEL_FILE, tmp / DATA_FILE) if f.exists())
    return ExportResult(path=out / MODEL_FILE, layout=layout, precision=precision,
                        seconds=time.perf_counter() - start, peak_rss_mb=_peak_rss_mb(), size_bytes=size,
                        external_data=True, nodes=nodes, structure=structure)


def export_model(model: CqilModel, out: Path, layout: str = "branches", precision: str = "fp32",
                 source: dict | None = None, tokenizer=None, external_data: bool | None = None,
                 progress: bool = True, quantization: Quantization = DEFAULT_QUANTIZATION,
                 target: str = "portable") -> ExportResult:
    """Export `model` (its plan decides the groups) into the folder `out`, replacing it on success.

    `external_data` None: weights go to model.onnx.data past EXTERNAL_DATA_THRESHOLD bytes.
    `quantization`: how int8/int4 weights are made (export.precision). `target` onnxruntime: the
    model builder's graph with the plan's groups (`export.ort_target`).
    """
    import onnx
    import onnx_ir as ir
    from cqil.export.onnx_export import export_layout

    check_options(layout, precision, quantization, target)
    out = Path(out)
    check_writable(out)
    if target == "onnxruntime":
        return _export_onnxruntime(model, out, layout, precision, quantization, source or {}, tokenizer)
    start = time.perf_counter()
    steps = tqdm(total=4, desc="export", unit="step", disable=not progress, leave=False)
    steps.set_postfix_str("torch.export -> ONNX")
    dtype = getattr(torch, TRACE_DTYPES[precision])
    model = _in_dtype(model, dtype)
    ir_model = export_layout(_layout_module(model, layout), model, dtype)
    contract.name_total_dims(ir_model.graph)
    ir_model.metadata_props.update(_metadata(model, layout, precision, source or {}, target, quantization))
    if is_quantized(precision):
        steps.set_postfix_str(f"{precision} weights (MatMulNBits)")
        ir_model = _quantized(ir_model, precision, quantization)
    nodes = len(list(ir_model.graph))
    steps.update()
    weight_bytes = sum(value.const_value.nbytes for value in ir_model.graph.initializers.values())
    external = weight_bytes > EXTERNAL_DATA_THRESHOLD if external_data is None else external_data
    with atomic_dir(out) as tmp:
        steps.set_postfix_str("save")
        ir.save(ir_model, tmp / MODEL_FILE, external_data=DATA_FILE if external else None,
                size_threshold_bytes=1024)
        del ir_model
        _write_side_files(tmp, model, precision, tokenizer)
        _write_source_file(tmp, source or {})
        steps.update()
        steps.set_postfix_str("onnx.checker + shape inference")
        onnx.checker.check_model(str(tmp / MODEL_FILE), full_check=True)
        steps.update()
        structure = None
        if layout == "branches":
            steps.set_postfix_str("branch structure")
            structure = check_branch_structure(tmp / MODEL_FILE)
            if not structure.ok:
                raise CqilError(f"the exported graph lost its branches: {structure.describe()}")
        steps.update()
        size = sum(f.stat().st_size for f in (tmp / MODEL_FILE, tmp / DATA_FILE) if f.exists())
    steps.close()
    return ExportResult(path=out / MODEL_FILE, layout=layout, precision=precision, seconds=time.perf_counter() - start,
                        peak_rss_mb=_peak_rss_mb(), size_bytes=size, external_data=external, nodes=nodes,
                        structure=structure)
