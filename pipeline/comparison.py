"""Which models `cqil eval` puts side by side: original, CQIL, and CQIL with its recovery adapter.

- plain model + plan: original and "cqil".
- model + `--adapter`: original and "cqil_no_adapter" (adapters disabled), and "cqil" (adapters on),
  all over one copy of the weights.
- merged CQIL checkpoint: "original" is the base model recorded in its config, "cqil_no_adapter" the
  base model under the plan, and "cqil" the merged checkpoint itself.
In every case "cqil" is the CQIL model as it would be deployed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cqil.model.cqil import CqilModel
from cqil.model.errors import CqilError
from cqil.model.plan import Plan, identity_plan
from cqil.pipeline.adapters import AdaptersOff, load_adapter
from cqil.pipeline.merge import base_model_record, find_base_model
from cqil.pipeline.sources import LoadedModel, load_model

LABELS = {"original": "original", "cqil_no_adapter": "cqil", "cqil": "cqil+adapter"}


def comparison_models(loaded: LoadedModel, plan: Plan, adapter: Path | None = None,
                      base_model: str | None = None) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(original, {name: candidate}, provenance) for `quality.evaluate`."""
    config = loaded.model.config
    identity = identity_plan(config.num_hidden_layers)
    record = base_model_record(config)
    if adapter is not None:
        if record is not None:
            raise CqilError(f"'{loaded.path}' is a merged CQIL checkpoint that already holds its adapter: "
                            "drop --adapter, or pass the base model as --model")
        peft_model = load_adapter(loaded.model, adapter)
        cqil = CqilModel(loaded.model, plan)
        original = AdaptersOff(cqil.with_plan(identity), peft_model)
        return original, {"cqil_no_adapter": AdaptersOff(cqil, peft_model), "cqil": cqil}, {"adapter": str(adapter)}
    if record is not None or base_model is not None:
        base = load_model(base_model or find_base_model(record))
        base_config = base.model.config
        if (base_config.num_hidden_layers, base_config.hidden_size) != (config.num_hidden_layers, config.hidden_size):
            raise CqilError(f"the base model '{base.path}' does not match '{loaded.path}' (layers/hidden size): "
                            "pass the model it was merged from as --base-model")
        original = CqilModel(base.model, identity)
        candidates = {"cqil_no_adapter": original.with_plan(plan), "cqil": CqilModel(loaded.model, plan)}
        return original, candidates, {"base_model": {"name": base.name, "path": str(base.path)}}
    original = CqilModel(loaded.model, identity)
    return original, {"cqil": original.with_plan(plan)}, {}
