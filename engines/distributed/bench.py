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

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from cqil.engines.bench_settings import RankBenchSettings
from cqil.engines.distributed.launch import RankContext
from cqil.engines.latency import BenchResult, compare, interleaved_times, ratio_ci, stats_ms
from cqil.model.steps import HFStep, timing_calls


def rank_hooks(threads: dict[str, int]) -> tuple[Callable[[str], None], Callable[[str], None]]:
    """Timer hooks: switch threads and wait for every rank before a call, wait again after it."""

    def before(name: str) -> None:
        if torch.get_num_threads() != threads[name]:
            torch.set_num_threads(threads[name])
        dist.barrier()

    return before, lambda _name: dist.barrier()


def _idle() -> None:
    """A rank's share of a row that only rank 0 runs: wait at the barriers."""


def run_rank_bench(ctx: RankContext, models: dict[str, Any], settings: RankBenchSettings) -> dict[str, Any] | None:
    """Time the three rows on every rank; rank 0 returns the cqil-bench/1 dict, the others None.

    `models`: "one_process" (the original HF model, rank 0 only; None elsewhere), "tensor_parallel"
    (this rank's TP shard, an HF model) and "cqil" (this rank's CQIL share, `per_rank.rank_model`).
    """
    generator = torch.Generator().manual_seed(settings.seed)
    vocab = models["tensor_parallel"].config.vocab_size
    ids = torch.randint(0, vocab, (settings.batch, settings.past + settings.seq), generator=generator).to(ctx.device)
    pairs = {"one_process": (timing_calls(HFStep(models["one_process"]), ids, settings.past) if ctx.rank == 0
                             else (_idle, _idle)),
             "tensor_parallel": timing_calls(HFStep(models["tensor_parallel"]), ids, settings.past),
             "cqil": timing_calls(models["cqil"], ids, settings.past)}
    threads = {"one_process": settings.one_process_threads or ctx.world, "tensor_parallel": settings.threads,
               "cqil": settings.threads}
    shapes = {"prefill": {"batch": settings.batch, "seq": settings.seq, "past": 0},
              "decode": {"batch": settings.batch, "seq": 1, "past": settings.past}}
    repeats = {"prefill": settings.prefill_repeats, "decode": settings.decode_repeats}
    before, after = rank_hooks(threads)
    synchronize = torch.cuda.synchronize if ctx.device.type == "cuda" else None  # GPU work counts where launched
    scenarios, rows = {}, {}
    for index, scenario in enumerate(("prefill", "decode")):
        times = interleaved_times({name: pair[index] for name, pair in pairs.items()}, repeats[scenario],
                                  settings.warmup, synchronize, before=before, after=after)
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
