"""LoRA adapters: the recovery settings, checking a peft adapter against a model, loading it.

Any peft LoRA adapter for the same base model loads: ours, and the official CQIL adapters, whose
`target_modules` are fully qualified names (`model.layers.12.self_attn.q_proj`). An adapter made for
another model is refused before any weights are touched: it names modules this model lacks, its
tensors have the wrong shapes, or it covers a different number of layers (e.g. its short target
names would wrap layers of this model it has no weights for).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cqil.model.errors import CqilError
from cqil.model.plan import plan_from_dict

if TYPE_CHECKING:  # torch is imported where it is used, so `cqil --help` stays quick
    from torch import nn

# The official recovery settings: r = 32, alpha = r, no dropout, every projection of every layer.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_RANK = 32
ADAPTER_CONFIG = "adapter_config.json"
RUN_RECORD = "training_run.json"  # what `cqil finetune` writes beside the adapter
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
# peft saves a LoRA pair per wrapped module as <module>.lora_A.weight / <module>.lora_B.weight.
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def lora_config(rank: int = DEFAULT_RANK, alpha: float | None = None, dropout: float = 0.0,
                targets: Sequence[str] = DEFAULT_TARGETS):
    """A peft LoraConfig for causal-LM recovery; alpha defaults to the rank, as in the official code."""
    from peft import LoraConfig, TaskType

    if rank < 1:
        raise CqilError(f"--rank {rank} must be at least 1 (official: {DEFAULT_RANK})")
    if not 0.0 <= dropout < 1.0:
        raise CqilError(f"--lora-dropout {dropout} must be in [0, 1)")
    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=rank, lora_alpha=rank if alpha is None else alpha,
                      lora_dropout=dropout, target_modules=list(targets))


def check_targets_exist(model: nn.Module, targets: Sequence[str]) -> None:
    """Refuse --targets that wrap no module of the model (peft would fail later, less clearly)."""
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise CqilError(f"--targets {','.join(missing)} match no module of this model: "
                        f"use names like {','.join(DEFAULT_TARGETS)}")


def adapter_weights_file(adapter_dir: Path) -> Path:
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise CqilError(f"'{adapter_dir}' is not a peft adapter directory: it has no {ADAPTER_CONFIG}")
    for name in ADAPTER_WEIGHTS:
        if (adapter_dir / name).is_file():
            return adapter_dir / name
    raise CqilError(f"adapter '{adapter_dir}' has no weights ({' or '.join(ADAPTER_WEIGHTS)})")


def adapter_tensor_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of an adapter's tensors, read without loading the tensors."""
    try:
        if weights.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt") as handle:
                return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        import torch

        state = torch.load(weights, map_location="meta", weights_only=True)
        return {key: tuple(value.shape) for key, value in state.items()}
    except Exception as exc:
        raise CqilError(f"adapter weights '{weights}' could not be read ({type(exc).__name__}: {exc})") from exc


def read_adapter_config(adapter_dir: Path):
    from peft import PeftConfig

    path = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CqilError(f"'{path}' is not valid JSON ({exc})") from exc
    if data.get("peft_type") != "LORA":
        raise CqilError(f"adapter '{adapter_dir}' is a {data.get('peft_type')!r} adapter; only LoRA adapters load here")
    try:
        return PeftConfig.from_pretrained(str(adapter_dir))
    except Exception as exc:
        raise CqilError(f"'{path}' is not a usable peft config ({type(exc).__name__}: {exc})") from exc


def validate_adapter(adapter_dir: Path, model: nn.Module) -> None:
    """Refuse, before any work, an adapter that was not made for this model's architecture and size."""
    from peft.tuners.tuners_utils import check_target_module_exists
    from torch import nn

    weights = adapter_weights_file(adapter_dir)
    config = read_adapter_config(adapter_dir)
    check_base_model(adapter_dir, model)
    shapes = adapter_tensor_shapes(weights)
    modules = dict(model.named_modules())
    num_layers = model.config.num_hidden_layers

    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        match = LORA_KEY.match(key.removeprefix(PEFT_PREFIX))
        if match is None:
            raise CqilError(f"adapter '{adapter_dir}' holds '{key}', which is not a LoRA weight of a linear "
                            "layer; only plain LoRA adapters load here")
        pairs.setdefault(match["module"], {})[match["part"]] = shape
    if not pairs:
        raise CqilError(f"adapter '{adapter_dir}' holds no LoRA weights")

    missing = sorted(name for name in pairs if name not in modules)
    wrapped = {name for name, module in modules.items()
               if isinstance(module, nn.Linear) and check_target_module_exists(config, name)}
    without_weights = sorted(wrapped - set(pairs))
    if missing or without_weights:
        raise CqilError(_mismatch_message(adapter_dir, pairs, missing, without_weights, num_layers))

    for name, parts in sorted(pairs.items()):
        module = modules[name]
        if not isinstance(module, nn.Linear):
            raise CqilError(f"adapter '{adapter_dir}' wraps '{name}', which is a {type(module).__name__} "
                            "in this model, not a linear layer")
        if set(parts) != {"A", "B"}:
            raise CqilError(f"adapter '{adapter_dir}' has only lora_{''.join(parts)} for '{name}': it is incomplete")
        a, b = parts["A"], parts["B"]
        expected_a = (a[0], module.in_features)
        expected_b = (module.out_features, a[0])
        if a != expected_a or b != expected_b:
            raise CqilError(
                f"adapter '{adapter_dir}' does not fit this model: '{name}' is {module.in_features}->"
                f"{module.out_features} here but the adapter's LoRA pair is A{list(a)} B{list(b)}; "
                "use an adapter trained for this base model"
            )


def recorded_base_model(adapter_dir: Path) -> dict[str, Any]:
    """What an adapter records of the model it was trained on: class, family, layers, hidden size.

    peft's own `auto_mapping.base_model_class` where present, and for ours the model record of the
    plan in the run record (training_run.json). Empty for an adapter that records nothing.
    """
    adapter_dir = Path(adapter_dir)
    recorded: dict[str, Any] = {}
    try:
        mapping = json.loads((adapter_dir / ADAPTER_CONFIG).read_text()).get("auto_mapping") or {}
        model = json.loads((adapter_dir / RUN_RECORD).read_text()).get("plan", {}).get("model", {}) \
            if (adapter_dir / RUN_RECORD).is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise CqilError(f"adapter '{adapter_dir}' has an unreadable record of its base model ({exc})") from exc
    architecture = mapping.get("base_model_class") or model.get("architecture")
    if architecture and architecture != "?":
        recorded["class"] = architecture
    for key, name in (("model_type", "model_type"), ("num_layers", "layers"), ("hidden_size", "hidden_size")):
        if model.get(key):
            recorded[name] = model[key]
    return recorded


def check_base_model(adapter_dir: Path, model: nn.Module) -> None:
    """Refuse an adapter whose recorded base model is another one, even when its shapes happen to fit."""
    config = model.config
    this = {"class": type(model).__name__, "model_type": config.model_type, "layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size}
    recorded = recorded_base_model(adapter_dir)
    differ = [key for key, value in recorded.items() if this[key] != value]
    if differ:
        def describe(record: dict) -> str:
            return ", ".join(f"{key.replace('_', ' ')} {record[key]}" for key in differ)
        raise CqilError(f"adapter '{adapter_dir}' was trained on another model ({describe(recorded)}; this model: "
                        f"{describe(this)}): use an adapter trained for this base model")


def _mismatch_message(adapter_dir: Path, pairs: dict, missing: list[str], without_weights: list[str],
                      num_layers: int) -> str:
    adapter_layers = sorted({int(m.group(1)) for name in pairs if (m := LAYER_INDEX.search("." + name))})
    if adapter_layers and (adapter_layers[-1] >= num_layers or
                           any(LAYER_INDEX.search("." + name) for name in without_weights)):
        return (f"adapter '{adapter_dir}' was made for a model with another layer count: it has weights for "
                f"layers {adapter_layers[0]}..{adapter_layers[-1]}, this model has {num_layers} layers "
                f"(0..{num_layers - 1}); use an adapter trained for this base model")
    if missing:
        shown = ", ".join(missing[:3]) + (f" (and {len(missing) - 3} more)" if len(missing) > 3 else "")
        return (f"adapter '{adapter_dir}' has weights for modules this model does not have: {shown}; "
                "use an adapter trained for this base model")
    shown = ", ".join(without_weights[:3]) + (f" (and {len(without_weights) - 3} more)" if len(without_weights) > 3 else "")
    return (f"adapter '{adapter_dir}' targets modules it has no weights for: {shown}; "
            "its adapter_config.json does not match its weights")


def load_adapter(model: nn.Module, adapter_dir: Path, trainable: bool = False):
    """Validate, then wrap `model` in place with the adapter; returns the PeftModel."""
    from peft import PeftModel

    validate_adapter(adapter_dir, model)
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


class AdaptersOff:
    """Calls a CqilModel with the peft adapters disabled: the original weights, no second copy."""

    def __init__(self, model: nn.Module, peft_model: Any):
        self.model = model
        self.peft_model = peft_model

    def __call__(self, *args, **kwargs):
        with self.peft_model.disable_adapter():
            return self.model(*args, **kwargs)


def adapter_plan(adapter_dir: Path, num_layers: int):
    """The plan an adapter of ours was trained for (from its run record), or None for a foreign adapter."""

    path = Path(adapter_dir) / RUN_RECORD
    if not path.is_file():
        return None
    try:
        return plan_from_dict(json.loads(path.read_text())["plan"], num_layers)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CqilError(f"'{path}' is not a readable training record ({exc}): pass the plan explicitly") from exc


def check_adapter_plan(adapter_dir: Path, plan: Any, strict: bool = False) -> None:
    """An adapter distilled for another plan of the same model: one warning line, or refused with --strict."""
    import sys

    trained = adapter_plan(adapter_dir, plan.num_layers)
    if trained is None or (trained.groups, trained.bypass) == (plan.groups, plan.bypass):
        return
    message = (f"adapter '{adapter_dir}' was distilled for the plan {trained.describe()}, not {plan.describe()}: "
               "its recovery does not carry over")
    if strict:
        raise CqilError(f"{message} (--strict): use its plan (leave the plan options out) or another adapter")
    print(f"warning: {message}", file=sys.stderr)
