"""Merge a LoRA adapter into the weights and save a CQIL checkpoint that reloads with its plan.

The result is an ordinary HF safetensors directory. Its config.json carries the plan under
`plan.CONFIG_KEY` (so every later stage picks it up by itself) and a record of the base model it was
made from under `BASE_KEY` (so `cqil eval` can compare with the original again).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cqil.model.errors import CqilError
from cqil.model.fsutil import atomic_dir, cache_dir
from cqil.model.plan import CONFIG_KEY, Plan
from cqil.pipeline.adapters import load_adapter
from cqil.pipeline.sources import (
    DEFAULT_MODEL_NAME,
    LoadedModel,
    check_model_dir,
    default_model_dir,
    model_name,
)

BASE_KEY = "cqil_base_model"  # config.json: {"name": ..., "path": ...} of the model before merging


def merge_adapter(loaded: LoadedModel, plan: Plan, adapter_dir: Path | None, out: Path) -> Path:
    """Merge `adapter_dir` into `loaded` (peft merge_and_unload) and write the checkpoint to `out`.

    Without an adapter the checkpoint is the base weights carrying the plan (a CQIL model without recovery).
    """
    model = loaded.model
    plan.check_fits(model.config)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    merged = load_adapter(model, adapter_dir).merge_and_unload() if adapter_dir else model
    if tied and merged.get_output_embeddings().weight is not merged.get_input_embeddings().weight:
        raise CqilError(f"merging '{adapter_dir}' untied the input and output embeddings: the adapter "
                        "changes one of them; merge only adapters of the decoder layers")
    setattr(merged.config, CONFIG_KEY, plan.to_dict())
    setattr(merged.config, BASE_KEY, {"name": loaded.name, "path": str(Path(loaded.path).resolve())})
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
    return Path(out)


def base_model_record(config: Any) -> dict[str, str] | None:
    """The base-model record of a merged CQIL checkpoint, or None for any other model."""
    record = getattr(config, BASE_KEY, None)
    return dict(record) if record else None


def find_base_model(record: dict[str, str]) -> Path:
    """The base model again: its recorded path, else the default model, else the source cache by name."""
    path = Path(record.get("path", ""))
    if path.is_dir() and (path / "config.json").is_file():
        check_model_dir(path)
        return path
    name = record.get("name", "")
    if name == DEFAULT_MODEL_NAME:
        return default_model_dir()
    models = cache_dir() / "models"
    for candidate in sorted(models.iterdir()) if models.is_dir() else []:
        if (candidate / "config.json").is_file() and model_name(candidate) == name:
            return candidate
    raise CqilError(f"the base model '{name}' this checkpoint was merged from is neither at '{path}' nor in "
                    f"the source cache {models}: pass it with --base-model")
