"""`cqil bench`: latency of the original model (reference) and the CQIL model (candidate) on one engine.

Both ONNX files run on ONNX Runtime with the same providers and threads, interleaved round by round
in one process after a warm-up (engines.latency), so load from other jobs hits both alike:

- prefill: batch x seq new tokens, empty cache;
- decode: one new token per row over a cache of `past` tokens (the cache the model itself produced
  for a prefill of that length; it does not grow between rounds, so every round times the same step).

Optionally the eager PyTorch reference and CQIL models run in the same rounds, as extra rows, under
one schedule (`schedule_models`: sequential, CUDA streams or packed). Every row is timed through the
one step harness (model/steps.py `timing_calls`) and the one interleaved timer. The
result is the `cqil-bench/1` JSON (engines/latency.py) that `cqil gate` reads, plus a PNG chart.
Where the reference ONNX comes from when none is given is orchestration: pipeline/reference.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cqil.engines.bench_settings import SCHEDULES, BenchSettings
from cqil.engines.cuda_streams import StreamSchedule
from cqil.engines.latency import BenchResult, compare, interleaved_times, ratio_ci, stats_ms
from cqil.engines.onnxruntime import OrtRunner
from cqil.export.contract import LAYOUT_KEY, find_onnx
from cqil.model.cqil import CqilModel
from cqil.model.errors import CqilError
from cqil.model.plan import Plan, identity_plan
from cqil.model.steps import timing_calls

# -- timing -----------------------------------------------------------------------------------------

def _check_pair(candidate, reference) -> None:
    cand, ref = candidate.spec, reference.spec
    layers = cand.num_layers if cand.plan is None else cand.plan.num_layers  # a dropped layer has no cache input
    if (layers, cand.kv_heads, cand.head_dim) != (ref.num_layers, ref.kv_heads, ref.head_dim):
        raise CqilError(f"reference '{reference.path}' ({ref.num_layers} layers, {ref.kv_heads}x{ref.head_dim} cache) "
                        f"is not the same model as candidate '{candidate.path}' ({cand.num_layers} layers, "
                        f"{cand.kv_heads}x{cand.head_dim}): export the original of the candidate's model")
    if ref.plan is not None and not ref.plan.is_identity:
        raise CqilError(f"reference '{reference.path}' is a CQIL model ({ref.plan.describe()}): the reference "
                        "is the original model (`cqil export --original`)")
    if cand.plan is None:
        raise CqilError(f"candidate '{candidate.path}' has no cqil.plan metadata: export it with `cqil export`")
    if cand.kv_dtype != ref.kv_dtype:
        raise CqilError(f"reference cache is {ref.kv_dtype}, candidate {cand.kv_dtype}: export both in one dtype")


def schedule_models(hf_model: torch.nn.Module, plan: Plan, schedule: str) -> dict[str, CqilModel]:
    """The eager PyTorch rows on one set of weights: the original model (reference) and CQIL (candidate),
    both under `schedule` — one piece after another, a CUDA stream per branch (on the GPU), or packed."""
    if schedule not in SCHEDULES:
        raise CqilError(f"--schedule {schedule} is not one of {', '.join(SCHEDULES)}")
    reference_plan = identity_plan(plan.num_layers)
    if schedule == "streams":
        if not torch.cuda.is_available():
            raise CqilError("--schedule streams runs each branch on its own CUDA stream and needs a CUDA GPU, "
                            "and none is visible here: use --schedule sequential or packed")
        hf_model = hf_model.to("cuda")
        return {"reference": CqilModel(hf_model, reference_plan, StreamSchedule()),
                "candidate": CqilModel(hf_model, plan, StreamSchedule())}
    return {"reference": CqilModel(hf_model, reference_plan, packed=schedule == "packed"),
            "candidate": CqilModel(hf_model, plan, packed=schedule == "packed")}


def _vocab(runner) -> int:
    size = runner.session.get_outputs()[0].shape[-1]
    return size if isinstance(size, int) and size > 0 else 2


def run_bench(candidate_onnx: Path, reference_onnx: Path, settings: BenchSettings,
              torch_models: Mapping[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Time reference and candidate ONNX interleaved; `torch_models` {"reference": m, "candidate": m}
    (eager CqilModels) adds PyTorch rows timed in the same rounds. Returns the cqil-bench/1 dict."""
    candidate = OrtRunner(find_onnx(Path(candidate_onnx)), settings.providers, settings.threads, spin=False)
    reference = OrtRunner(find_onnx(Path(reference_onnx)), settings.providers, settings.threads, spin=False)
    _check_pair(candidate, reference)
    if torch_models is not None and set(torch_models) != {"reference", "candidate"}:
        raise CqilError("torch_models needs exactly the keys 'reference' and 'candidate'")
    generator = torch.Generator().manual_seed(settings.seed)
    ids = torch.randint(0, _vocab(candidate), (settings.batch, settings.past + settings.seq), generator=generator)
    on_gpu = any(model.hf.device.type == "cuda" for model in (torch_models or {}).values())
    synchronize = torch.cuda.synchronize if on_gpu else None  # GPU work counts in the call that launched it
    threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        calls = {"reference": timing_calls(reference, ids, settings.past),
                 "candidate": timing_calls(candidate, ids, settings.past)}
        for name, model in (torch_models or {}).items():
            calls[f"pytorch_{name}"] = timing_calls(model, ids.to(model.hf.device), settings.past)
        shapes = {"prefill": {"batch": settings.batch, "seq": settings.seq, "past": 0},
                  "decode": {"batch": settings.batch, "seq": 1, "past": settings.past}}
        repeats = {"prefill": settings.prefill_repeats, "decode": settings.decode_repeats}
        scenarios, rows = {}, {}
        for index, scenario in enumerate(("prefill", "decode")):
            times = interleaved_times({name: pair[index] for name, pair in calls.items()}, repeats[scenario],
                                      settings.warmup, synchronize, progress=f"bench {scenario}" if progress else None)
            scenarios[scenario] = compare(times["reference"], times["candidate"], shapes[scenario], settings.seed)
            rows[scenario] = _torch_rows(times, settings.seed)
    finally:
        torch.set_num_threads(threads)
    plan = candidate.spec.plan
    extra = {
        "engine": "onnxruntime",
        "providers": candidate.session.get_providers(),
        "settings": settings.to_dict(),
        "candidate": {"onnx": str(candidate.path), "plan": plan.describe(),
                      "layout": candidate.spec.metadata.get(LAYOUT_KEY)},
        "reference": {"onnx": str(reference.path)},
        "depth": {"groups": plan.depth, "layers": plan.num_layers},
    }
    result = BenchResult(scenarios, round(plan.depth / plan.num_layers, 6), extra).to_dict()
    for scenario, scenario_rows in rows.items():
        if scenario_rows:
            result["scenarios"][scenario]["rows"] = scenario_rows
    return result


def _torch_rows(times: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """The eager PyTorch rows; the candidate row carries its own ratio against the PyTorch reference."""
    if "pytorch_reference" not in times:
        return {}
    ref, cand = times["pytorch_reference"], times["pytorch_candidate"]
    return {"pytorch_reference": stats_ms(ref).to_dict(),
            "pytorch_candidate": {**stats_ms(cand).to_dict(),
                                  "ratio": round(float(np.median(cand) / np.median(ref)), 6),
                                  "ratio_ci": list(ratio_ci(ref, cand, seed=seed))}}
