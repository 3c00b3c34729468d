"""genai_config.json: what ONNX Runtime GenAI reads to run an exported folder with its own Generator.

The keys are those its model builder (`python -m onnxruntime_genai.models.builder`) writes for a
decoder: model type, context length, the decoder's input and output names (per-layer KV names as
printf patterns over the layer index), head counts and sizes, special token ids, and search
defaults taken from generation_config.json. Two choices differ from the builder's own exports:

- `past_present_share_buffer` is false: our graph returns presents of length past + seq (it
  concatenates), so the runtime must feed each step's presents back as the next past instead of
  preallocating one max_length buffer that the graph writes into.
- no `sliding_window` section: a sliding-window model (Mistral) masks inside our graph, so the
  runtime keeps the whole cache and the graph sees the same inputs as `cqil generate` gives it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cqil.export import contract
from cqil.model.errors import CqilError
from cqil.model.plan import plan_from_config

GENAI_CONFIG_FILE = "genai_config.json"
# ONNX Runtime GenAI's decoder-only model types (its model_type.h) for the families we export.
GENAI_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
# generation_config.json fields the builder copies into "search", with the builder's defaults.
SEARCH_DEFAULTS = {"diversity_penalty": 0.0, "do_sample": False, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
                   "num_beams": 1, "num_return_sequences": 1, "repetition_penalty": 1.0, "temperature": 1.0,
                   "top_k": 50, "top_p": 1.0}


def _per_layer(layer0_name: str) -> str:
    """`past_key_values.0.key` -> `past_key_values.%d.key`: the runtime formats it with each layer index."""
    return layer0_name.replace(".0.", ".%d.", 1)


def _kept_layers(config: Any) -> int:
    """Layers with a KV cache in the ONNX: those the config's CQIL plan keeps (all without a plan)."""
    plan = plan_from_config(config)
    return config.num_hidden_layers if plan is None else plan.num_kept


def genai_config(config: Any, generation_config: Any = None, filename: str = "model.onnx") -> dict:
    """The genai_config.json content for an HF `config` exported under our ONNX contract (DESIGN.md section 4)."""
    model_type = GENAI_MODEL_TYPES.get(getattr(config, "model_type", None))
    if model_type is None:
        raise CqilError(f"model type '{getattr(config, 'model_type', None)}' has no ONNX Runtime GenAI type here "
                        f"(supported: {', '.join(GENAI_MODEL_TYPES)})")
    heads = config.num_attention_heads
    head_size = getattr(config, "head_dim", None) or config.hidden_size // heads
    context = int(config.max_position_embeddings)

    def token(name: str) -> Any:
        value = getattr(generation_config, name, None) if generation_config is not None else None
        return value if value is not None else getattr(config, name, None)

    eos = token("eos_token_id")
    pad = token("pad_token_id")
    if pad is None:  # the runtime pads batched prompts with it; any id works, the mask hides it
        pad = eos[0] if isinstance(eos, list) else eos
    search = {}
    for name, default in SEARCH_DEFAULTS.items():
        value = getattr(generation_config, name, None)
        search[name] = default if value is None else value
    past_key, past_value = contract.past_pair(0)
    present_key, present_value = contract.present_pair(0)
    return {
        "model": {
            "bos_token_id": token("bos_token_id"),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": head_size,
                "hidden_size": config.hidden_size,
                "inputs": {
                    **{name: name for name in contract.TOKEN_INPUTS},
                    "past_key_names": _per_layer(past_key),
                    "past_value_names": _per_layer(past_value),
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": _per_layer(present_key),
                    "present_value_names": _per_layer(present_value),
                },
                "num_attention_heads": heads,
                "num_hidden_layers": _kept_layers(config),
                "num_key_value_heads": config.num_key_value_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": model_type,
            "vocab_size": config.vocab_size,
        },
        "search": {**search, "early_stopping": True, "max_length": context, "min_length": 0,
                   "past_present_share_buffer": False},
    }


def write_genai_config(folder: Path, config: Any, generation_config: Any = None,
                       filename: str = "model.onnx") -> Path:
    path = Path(folder) / GENAI_CONFIG_FILE
    path.write_text(json.dumps(genai_config(config, generation_config, filename), indent=2, sort_keys=True) + "\n")
    return path
