"""The equal-budget comparison (issue 19): several plans of one model, each before and after the *same*
recovery, on every held-out text: KL(original || plan), top-1 agreement and PPL.

Depth pruning is what users pick instead of CQIL, so CQIL's plans must be compared with pruning plans at
the same depth and with the same recovery budget (steps, tokens, LoRA rank, learning rate, seed). Every
plan trains from the same fresh weights on the same training chunks; only the plan differs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from cqil.model.cqil import CqilModel
from cqil.model.plan import Plan, identity_plan
from cqil.pipeline.comparison import comparison_models
from cqil.pipeline.quality import evaluate
from cqil.pipeline.recovery import FinetuneSettings, finetune
from cqil.pipeline.sources import load_model

COMPARE_FORMAT = "cqil-compare/1"
METRICS = ("kl", "top1", "ppl")


def evaluate_all(original: CqilModel, plans: Mapping[str, Plan], texts: Mapping[str, torch.Tensor],
                 batch_size: int, progress: bool) -> dict[str, dict[str, dict[str, float]]]:
    """{text: {"original" | plan name: metrics}}: one evaluation pass per text over every plan."""
    results = {}
    for text, chunks in texts.items():
        result = evaluate(original, {name: original.with_plan(plan) for name, plan in plans.items()}, chunks,
                          batch_size, progress)
        results[text] = {name: {m: result[name][m] for m in METRICS if m in result[name]}
                         for name in ("original", *plans)}
    return results


def compare(model_path: Path, plans: Mapping[str, Plan], train: torch.Tensor, texts: Mapping[str, torch.Tensor],
            settings: FinetuneSettings | None, workdir: Path, batch_size: int = 4,
            progress: bool = True) -> dict[str, Any]:
    """Every plan before recovery and, with `settings`, after it (adapters in `workdir/<name>`).

    The recovery's own held-out monitor reads the first text; the reported numbers come from one
    evaluation of each recovered plan on every text, against the original with adapters off.
    """
    loaded = load_model(model_path)
    layers = loaded.model.config.num_hidden_layers
    original = CqilModel(loaded.model, identity_plan(layers))
    report: dict[str, Any] = {"format": COMPARE_FORMAT, "plans": {n: p.to_dict() for n, p in plans.items()},
                              "texts": {t: {"chunks": len(c), "tokens": c.numel()} for t, c in texts.items()},
                              "before": evaluate_all(original, plans, texts, batch_size, progress)}
    if settings is None:
        return report
    report["recovery"] = {"steps": settings.steps, "lr": settings.lr, "rank": settings.rank,
                          "batch_size": settings.batch_size, "seed": settings.seed,
                          "tokens": settings.steps * settings.batch_size * settings.grad_accum * train.shape[1]}
    after: dict[str, dict[str, dict[str, float]]] = {text: {} for text in texts}
    first = next(iter(texts.values()))
    for name, plan in plans.items():
        adapter = Path(workdir) / name
        finetune(load_model(model_path).model, plan, train, first, settings, adapter, progress=progress)
        reference, candidates, _ = comparison_models(load_model(model_path), plan, adapter)
        for text, chunks in texts.items():
            result = evaluate(reference, {"recovered": candidates["cqil"]}, chunks, batch_size, progress)
            after[text][name] = {m: result["recovered"][m] for m in METRICS}
    report["after"] = after
    return report
