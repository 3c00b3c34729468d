"""The original model as ONNX, the reference that `cqil bench` and `cqil build` time a CQIL model against.

When no reference ONNX is given, the original model is exported once (identity plan) into the CQIL
cache, keyed by the source model's weights, the dtype and the tool version, and reused after that.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cqil.export.contract import DTYPE_KEY, PRECISION_KEY, ContractSpec
from cqil.export.precision import is_quantized, recorded_quantization
from cqil.export.writer import export_model
from cqil.model.cqil import CqilModel
from cqil.model.errors import CqilError
from cqil.model.fsutil import cache_dir, sha256_file
from cqil.model.plan import identity_plan, model_record
from cqil.model.version import __version__
from cqil.pipeline.sources import load_model, resolve_model_dir


def reference_key(source_path: Path, dtype: str, quantization: str = "") -> str:
    """Hash of the source model's config and weights, the dtype, the quantization (int8/int4) and the tool version."""
    files = sorted(p for p in Path(source_path).iterdir()
                   if p.name == "config.json" or p.suffix in (".safetensors", ".bin"))
    record = {"files": {p.name: sha256_file(p) for p in files}, "dtype": dtype, "tool": __version__}
    if quantization:
        record["quantization"] = quantization
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def cached_reference(spec: ContractSpec, onnx_path: Path, model: str | Path | None = None,
                     progress: bool = True) -> Path:
    """The original model as ONNX, exported once into the cache (identity plan, same dtype; int8/int4 weights
    quantized the way `onnx_path`'s were)."""
    source = spec.source_model()
    if model is None and not source.get("path"):
        raise CqilError(f"'{onnx_path}' does not record its source model (cqil.source_model): pass "
                        "--reference with an `cqil export --original` folder, or --model")
    path = resolve_model_dir(model if model is not None else source["path"])
    # The original at the CQIL file's precision (int8/int4 weights too), so the two compare like for like.
    dtype = spec.metadata.get(PRECISION_KEY) or spec.metadata.get(DTYPE_KEY, "fp32")
    quantization = recorded_quantization(spec.metadata)
    recipe = quantization.to_json() if is_quantized(dtype) else ""
    target = cache_dir() / "reference" / f"{path.name}-{dtype}-{reference_key(path, dtype, recipe)}"
    if (target / "model.onnx").is_file():
        return target
    loaded = load_model(path, dtype={"fp16": "float16"}.get(dtype, "float32"))
    config = loaded.model.config
    original = CqilModel(loaded.model, identity_plan(config.num_hidden_layers, model_record(config)))
    export_model(original, target, "branches", dtype, source={"name": loaded.name, "path": str(path)},
                 tokenizer=loaded.tokenizer, progress=progress, quantization=quantization)
    return target
