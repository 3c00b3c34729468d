"""`cqil bench`: latency of the original model (reference) and the CQIL model (candidate) on one engine.

Both ONNX files run on ONNX Runtime with the same providers and threads, interleaved round by round
in one process after a warm-up (engines.latency), so load from other jobs hits both alike:

- prefill: batch x seq new tokens, empty cache;
- decode: one new token per row over a cache of `past` tokens (the cache the model itself produced
  for a prefill of that length; it does not grow between rounds, so every round times the same step).

Optionally the eager PyTorch reference and CQIL models run in the same rounds, as extra rows. The
result is the `cqil-bench/1` JSON (engines/latency.py) that `cqil gate` reads, plus a PNG chart.
Where the reference ONNX comes from when none is given is orchestration: pipeline/reference.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cqil.engines.latency import BenchResult, compare, interleaved_times, ratio_ci, stats_ms
from cqil.export.contract import LAYOUT_KEY, find_onnx
from cqil.model.errors import CqilError


@dataclass(frozen=True)
class BenchSettings:
    batch: int = 1
    seq: int = 128  # prefill tokens per row
    past: int = 128  # decode context
    prefill_repeats: int = 20
    decode_repeats: int = 100
    warmup: int = 3
    threads: int | None = None  # ORT intra-op threads and torch threads; None: the libraries' default
    providers: tuple[str, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch", "seq", "past", "prefill_repeats", "decode_repeats"):
            if getattr(self, name) < 1:
                raise CqilError(f"--{name.replace('_', '-')} {getattr(self, name)} must be at least 1")
        if self.warmup < 0 or (self.threads is not None and self.threads < 1):
            raise CqilError(f"--warmup {self.warmup} must be >= 0 and --threads {self.threads} >= 1")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


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


def _vocab(runner) -> int:
    size = runner.session.get_outputs()[0].shape[-1]
    return size if isinstance(size, int) and size > 0 else 2


def ort_calls(runner, ids: torch.Tensor, past_len: int) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """Prefill and decode-step callables that only run the session (inputs are prepared once)."""
    batch = ids.shape[0]
    prefill = runner.feeds(ids[:, past_len:], torch.ones(batch, ids.shape[1] - past_len, dtype=torch.long))
    _, presents = runner(ids[:, :past_len], torch.ones(batch, past_len, dtype=torch.long))
    decode = runner.feeds(ids[:, :1], torch.ones(batch, past_len + 1, dtype=torch.long), past_key_values=presents)
    session, outputs = runner.session, runner.outputs
    return (lambda: session.run(outputs, prefill)), (lambda: session.run(outputs, decode))


def torch_calls(model, ids: torch.Tensor, past_len: int) -> tuple[Callable[[], Any], Callable[[], Any]]:
    batch = ids.shape[0]
    prefill_ids, prefill_mask = ids[:, past_len:], torch.ones(batch, ids.shape[1] - past_len, dtype=torch.long)
    with torch.no_grad():
        _, presents = model(ids[:, :past_len], torch.ones(batch, past_len, dtype=torch.long))
    decode_mask = torch.ones(batch, past_len + 1, dtype=torch.long)

    @torch.no_grad()
    def prefill():
        return model(prefill_ids, prefill_mask)

    @torch.no_grad()
    def decode():
        return model(ids[:, :1], decode_mask, past_key_values=presents)

    return prefill, decode


def run_bench(candidate_onnx: Path, reference_onnx: Path, settings: BenchSettings,
              torch_models: Mapping[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Time reference and candidate ONNX interleaved; `torch_models` {"reference": m, "candidate": m}
    (eager CqilModels) adds PyTorch rows timed in the same rounds. Returns the cqil-bench/1 dict."""
    from cqil.engines.onnxruntime import OrtRunner

    candidate = OrtRunner(find_onnx(Path(candidate_onnx)), settings.providers, settings.threads, spin=False)
    reference = OrtRunner(find_onnx(Path(reference_onnx)), settings.providers, settings.threads, spin=False)
    _check_pair(candidate, reference)
    if torch_models is not None and set(torch_models) != {"reference", "candidate"}:
        raise CqilError("torch_models needs exactly the keys 'reference' and 'candidate'")
    generator = torch.Generator().manual_seed(settings.seed)
    ids = torch.randint(0, _vocab(candidate), (settings.batch, settings.past + settings.seq), generator=generator)
    threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        calls = {"reference": ort_calls(reference, ids, settings.past),
                 "candidate": ort_calls(candidate, ids, settings.past)}
        for name, model in (torch_models or {}).items():
            calls[f"pytorch_{name}"] = torch_calls(model, ids, settings.past)
        shapes = {"prefill": {"batch": settings.batch, "seq": settings.seq, "past": 0},
                  "decode": {"batch": settings.batch, "seq": 1, "past": settings.past}}
        repeats = {"prefill": settings.prefill_repeats, "decode": settings.decode_repeats}
        scenarios, rows = {}, {}
        for index, scenario in enumerate(("prefill", "decode")):
            times = interleaved_times({name: pair[index] for name, pair in calls.items()}, repeats[scenario],
                                      settings.warmup, progress=f"bench {scenario}" if progress else None)
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
