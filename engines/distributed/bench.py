"""Latency of one process, tensor parallel on P ranks, and CQIL on P ranks, interleaved in one run.

All three run in the same torchrun job, so the same load from other jobs hits them alike: round i
times one process (rank 0 alone, with P threads; the other ranks wait), then tensor parallel, then
CQIL (every rank, 1 thread each by default), after a warm-up. Each call starts right after a barrier
and ends at the next one, so its time is the slowest rank's. Thread counts are switched before the
barrier, outside the timed region. Scenarios as in `cqil bench`: prefill (batch x seq, empty cache)
and one decode step over a past of `past` tokens (the cache is not grown between rounds).

The result is cqil-bench/1 (engines/latency.py): reference = tensor parallel (the honest baseline on
the same ranks), candidate = CQIL, so `cqil gate` checks CQIL against TP; the one-process row and the
ratios against it are kept under each scenario's "rows".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cqil.engines.distributed.launch import RankContext
from cqil.engines.latency import BenchResult, compare, ratio_ci, stats_ms
from cqil.engines.bench_settings import RankBenchSettings

ROWS = ("one_process", "tensor_parallel", "cqil")
LABELS = {"one_process": "one process", "tensor_parallel": "tensor parallel", "cqil": "CQIL per rank"}
COLORS = {"one_process": "#8da0cb", "tensor_parallel": "#4c72b0", "cqil": "#dd8452"}


def hf_calls(model, ids: torch.Tensor, past_len: int) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """Prefill and decode-step callables over an HF model's own forward (one process and TP rows)."""
    batch = ids.shape[0]
    prefill_ids = ids[:, past_len:]
    with torch.no_grad():
        cache = model(ids[:, :past_len], use_cache=True).past_key_values
    step_mask = torch.ones(batch, past_len + 1, dtype=torch.long, device=ids.device)
    step_position = torch.full((batch, 1), past_len, dtype=torch.long, device=ids.device)

    @torch.no_grad()
    def prefill():
        return model(prefill_ids, use_cache=True).logits

    @torch.no_grad()
    def decode():
        logits = model(ids[:, :1], attention_mask=step_mask, position_ids=step_position,
                       past_key_values=cache, use_cache=True).logits
        cache.crop(-1)  # the next round times the same step
        return logits

    return prefill, decode


def cqil_calls(model, ids: torch.Tensor, past_len: int) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """Prefill and decode-step callables over a CqilModel (flat cache; the past is not grown)."""
    batch = ids.shape[0]
    prefill_mask = torch.ones(batch, ids.shape[1] - past_len, dtype=torch.long, device=ids.device)
    with torch.no_grad():
        _, presents = model(ids[:, :past_len], torch.ones(batch, past_len, dtype=torch.long, device=ids.device))
    step_mask = torch.ones(batch, past_len + 1, dtype=torch.long, device=ids.device)

    @torch.no_grad()
    def prefill():
        return model(ids[:, past_len:], prefill_mask)

    @torch.no_grad()
    def decode():
        return model(ids[:, :1], step_mask, past_key_values=presents)

    return prefill, decode


def timed_rounds(ctx: RankContext, calls: dict[str, Callable[[], Any]], threads: dict[str, int],
                 repeats: int, warmup: int) -> dict[str, np.ndarray]:
    """Seconds per call, round-robin; a None call means this rank only waits at the barriers."""
    import torch.distributed as dist

    synchronize = torch.cuda.synchronize if ctx.device.type == "cuda" else (lambda: None)
    times = {name: np.empty(repeats) for name in calls}
    for i in range(-warmup, repeats):
        for name, fn in calls.items():
            if torch.get_num_threads() != threads[name]:
                torch.set_num_threads(threads[name])
            dist.barrier()
            start = time.perf_counter()
            if fn is not None:
                fn()
            synchronize()  # GPU work counts in the call that launched it
            dist.barrier()
            if i >= 0:
                times[name][i] = time.perf_counter() - start
    return times


def run_rank_bench(ctx: RankContext, models: dict[str, Any], settings: RankBenchSettings) -> dict[str, Any] | None:
    """Time the three rows on every rank; rank 0 returns the cqil-bench/1 dict, the others None.

    `models`: "one_process" (the original HF model, rank 0 only; None elsewhere), "tensor_parallel"
    (this rank's TP shard, an HF model) and "cqil" (this rank's CQIL share, `per_rank.rank_model`).
    """
    generator = torch.Generator().manual_seed(settings.seed)
    vocab = models["tensor_parallel"].config.vocab_size
    ids = torch.randint(0, vocab, (settings.batch, settings.past + settings.seq), generator=generator).to(ctx.device)
    pairs = {"one_process": hf_calls(models["one_process"], ids, settings.past) if ctx.rank == 0 else (None, None),
             "tensor_parallel": hf_calls(models["tensor_parallel"], ids, settings.past),
             "cqil": cqil_calls(models["cqil"], ids, settings.past)}
    threads = {"one_process": settings.one_process_threads or ctx.world, "tensor_parallel": settings.threads,
               "cqil": settings.threads}
    shapes = {"prefill": {"batch": settings.batch, "seq": settings.seq, "past": 0},
              "decode": {"batch": settings.batch, "seq": 1, "past": settings.past}}
    repeats = {"prefill": settings.prefill_repeats, "decode": settings.decode_repeats}
    scenarios, rows = {}, {}
    for index, scenario in enumerate(("prefill", "decode")):
        times = timed_rounds(ctx, {name: pair[index] for name, pair in pairs.items()}, threads,
                             repeats[scenario], settings.warmup)
        scenarios[scenario] = compare(times["tensor_parallel"], times["cqil"], shapes[scenario], settings.seed)
        rows[scenario] = _rows(times, settings.seed)
    if ctx.rank != 0:
        return None
    plan = models["cqil"].plan
    extra = {"engine": "torch.distributed", "backend": ctx.backend, "ranks": ctx.world,
             "reference_is": "tensor_parallel", "candidate_is": "cqil", "threads": threads,
             "settings": asdict(settings), "plan": plan.describe(),
             "depth": {"groups": plan.depth, "layers": plan.num_layers}}
    result = BenchResult(scenarios, round(plan.depth / plan.num_layers, 6), extra).to_dict()
    for scenario, scenario_rows in rows.items():
        result["scenarios"][scenario]["rows"] = scenario_rows
    return result


def _rows(times: dict[str, np.ndarray], seed: int) -> dict[str, Any]:
    """Every row's stats, and each parallel row's ratio to one process with its bootstrap interval."""
    single = times["one_process"]
    rows = {"one_process": stats_ms(single).to_dict()}
    for name in ("tensor_parallel", "cqil"):
        rows[name] = {**stats_ms(times[name]).to_dict(),
                      "ratio_to_one_process": round(float(np.median(times[name]) / np.median(single)), 6),
                      "ratio_to_one_process_ci": list(ratio_ci(single, times[name], seed=seed))}
    return rows


def plot_rank_bench(result: dict[str, Any], path: Path) -> Path:
    """PNG: p50 bar and p90 whisker per row and scenario; same result, same bytes."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from cqil.engines.bench_chart import write_png

    scenarios = list(result["scenarios"].items())
    with matplotlib.rc_context({"font.family": "DejaVu Sans", "font.size": 9}):
        fig, axes = plt.subplots(1, len(scenarios), figsize=(5 * len(scenarios), 2.8), squeeze=False)
        for ax, (name, scenario) in zip(axes[0], scenarios):
            rows = scenario["rows"]
            p50 = [rows[row]["p50_ms"] for row in ROWS]
            p90 = [rows[row]["p90_ms"] - rows[row]["p50_ms"] for row in ROWS]
            ax.barh(range(len(ROWS)), p50, xerr=[[0] * len(ROWS), p90], color=[COLORS[r] for r in ROWS], capsize=3)
            ax.set_yticks(range(len(ROWS)), [LABELS[r] for r in ROWS])
            ax.invert_yaxis()
            ax.set_xlabel("ms (bar p50, whisker p90)")
            low, high = scenario["ratio_ci"]
            shape = ", ".join(f"{k} {v}" for k, v in scenario["shape"].items())
            ax.set_title(f"{name} ({shape}), {result['ranks']} ranks {result['backend']}\n"
                         f"CQIL/TP {scenario['ratio']:.3f} [{low:.3f}, {high:.3f}]", fontsize=9)
        return write_png(fig, path)
