"""Tokenizer files beside the ONNX that load under transformers 4.x and 5.x alike.

Transformers 5 saves a fast tokenizer with `tokenizer_class: "TokenizersBackend"`, a class 4.x does
not have, and its extra special tokens as a list under `extra_special_tokens`, where 4.x expects a
name -> token mapping (it fails with "'list' object has no attribute 'keys'"). Optimum pins
transformers < 4.58, so its users would get a folder whose model loads and whose tokenizer does not.
The portable spelling is the one both read: `PreTrainedTokenizerFast` (5.x aliases it to
TokenizersBackend) over tokenizer.json, and the list under `additional_special_tokens`. The
tokenizer's `model_input_names` are written out too: 4.x's PreTrainedTokenizerFast would otherwise
also return `token_type_ids`, which the decoder does not take (Optimum's generate refuses them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TOKENIZER_CONFIG = "tokenizer_config.json"
PORTABLE_FAST_CLASS = "PreTrainedTokenizerFast"
_V5_ONLY_CLASSES = ("TokenizersBackend",)
# Loader bookkeeping that 5.x writes about where it read the files from, not tokenizer settings.
_LOADER_KEYS = ("is_local", "local_files_only")


def portable_tokenizer_config(config: dict[str, Any], has_tokenizer_json: bool,
                              model_input_names: list[str] | None = None) -> dict[str, Any]:
    """`config` (a tokenizer_config.json) rewritten so that transformers 4.x and 5.x both load it."""
    config = {key: value for key, value in config.items() if key not in _LOADER_KEYS}
    if model_input_names and "model_input_names" not in config:
        config["model_input_names"] = list(model_input_names)
    if config.get("tokenizer_class") in _V5_ONLY_CLASSES and has_tokenizer_json:
        config["tokenizer_class"] = PORTABLE_FAST_CLASS
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list):
        del config["extra_special_tokens"]
        known = list(config.get("additional_special_tokens") or [])
        config["additional_special_tokens"] = known + [token for token in extra if token not in known]
    return config


def write_tokenizer_files(tokenizer: Any, folder: Path) -> None:
    """Save `tokenizer` into `folder` (tokenizer.json, tokenizer_config.json, chat template) portably."""
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    path = folder / TOKENIZER_CONFIG
    if path.is_file():
        config = portable_tokenizer_config(json.loads(path.read_text()), (folder / "tokenizer.json").is_file(),
                                           getattr(tokenizer, "model_input_names", None))
        path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
