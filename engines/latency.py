"""Latency measurement and the bench JSON that `cqil gate` reads.

Timing: the callables being compared run interleaved (A B C A B C ...) after a warm-up, in one
process, so drift in clocks, caches and other load hits all of them alike. The ratio candidate /
reference is a ratio of medians; its confidence interval is a bootstrap over the interleaved rounds
(paired: round i of both is resampled together), with a fixed seed so reruns print the same interval.

Bench JSON (format "cqil-bench/1"), the layout a bench writes and a gate reads:

    {
      "format": "cqil-bench/1",
      "ideal_depth_ratio": 0.6,             # groups / layers of the candidate's plan
      "scenarios": {
        "decode": {                         # any name; "prefill" and "decode" by convention
          "shape": {"batch": 1, "seq": 1, "past": 128},
          "reference": {"p50_ms": 1.9, "p90_ms": 2.0, "p99_ms": 2.3, "n": 200},
          "candidate": {"p50_ms": 1.4, "p90_ms": 1.5, "p99_ms": 1.7, "n": 200},
          "ratio": 0.74,                    # candidate p50 / reference p50
          "ratio_ci": [0.72, 0.76]          # bootstrap interval of the ratio
        }
      },
      ...                                   # any further fields (engine, device, extra rows) are kept
    }

A scenario may carry further keys too (`cqil bench` adds "rows": the eager PyTorch models timed in
the same rounds); readers ignore what they do not know.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cqil.model.errors import CqilError
from tqdm import tqdm

BENCH_FORMAT = "cqil-bench/1"
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Stats:
    p50_ms: float
    p90_ms: float
    p99_ms: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {"p50_ms": self.p50_ms, "p90_ms": self.p90_ms, "p99_ms": self.p99_ms, "n": self.n}


@dataclass(frozen=True)
class Scenario:
    reference: Stats
    candidate: Stats
    ratio: float
    ratio_ci: tuple[float, float]
    shape: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"shape": dict(self.shape), "reference": self.reference.to_dict(),
                "candidate": self.candidate.to_dict(), "ratio": self.ratio, "ratio_ci": list(self.ratio_ci)}


@dataclass(frozen=True)
class BenchResult:
    scenarios: dict[str, Scenario]
    ideal_depth_ratio: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"format": BENCH_FORMAT, "ideal_depth_ratio": self.ideal_depth_ratio,
                "scenarios": {name: s.to_dict() for name, s in self.scenarios.items()}, **self.extra}


# -- measuring --------------------------------------------------------------------------------------

def interleaved_times(callables: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 3,
                      synchronize: Callable[[], None] | None = None, progress: str | None = None,
                      before: Callable[[str], None] | None = None,
                      after: Callable[[str], None] | None = None) -> dict[str, np.ndarray]:
    """Seconds per call of each callable, run round-robin `repeats` times after `warmup` rounds.

    `synchronize` (e.g. torch.cuda.synchronize) runs before each clock read, so asynchronous work
    is counted in the call that launched it. `before(name)` runs before a call's clock starts and
    `after(name)` after `synchronize`, before it stops, warm-up rounds included: where ranks time one
    call together, `before` switches threads and waits at a barrier and `after` waits at the next one,
    so a call's time is the slowest rank's. `progress` names a tqdm bar over the rounds.
    """
    if repeats < 1:
        raise CqilError(f"repeats {repeats} must be at least 1")
    sync = synchronize or _nothing
    before, after = before or _nothing, after or _nothing
    for _ in range(warmup):
        for name, fn in callables.items():
            before(name)
            fn()
            after(name)
    sync()
    times = {name: np.empty(repeats) for name in callables}
    for i in tqdm(range(repeats), desc=progress, unit="round", disable=progress is None, leave=False):
        for name, fn in callables.items():
            before(name)
            start = time.perf_counter()
            fn()
            sync()
            after(name)
            times[name][i] = time.perf_counter() - start
    return times


def _nothing(*_args: Any) -> None:
    """The hook where none is given."""


def stats_ms(seconds: np.ndarray) -> Stats:
    """p50/p90/p99 in milliseconds (numpy's linear interpolation)."""
    values = np.percentile(np.asarray(seconds, dtype=float) * 1e3, PERCENTILES)
    return Stats(*(round(float(v), 6) for v in values), n=len(seconds))


def ratio_ci(reference: np.ndarray, candidate: np.ndarray, confidence: float = 0.95,
             resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Paired bootstrap interval of median(candidate) / median(reference)."""
    reference, candidate = np.asarray(reference, float), np.asarray(candidate, float)
    if len(reference) != len(candidate) or len(reference) == 0:
        raise CqilError("ratio_ci needs the same non-zero number of interleaved reference and candidate times")
    rng = np.random.default_rng(seed)
    rounds = rng.integers(0, len(reference), size=(resamples, len(reference)))
    ratios = np.median(candidate[rounds], axis=1) / np.median(reference[rounds], axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(ratios, (tail, 100 - tail))
    return round(float(low), 6), round(float(high), 6)


def compare(reference: np.ndarray, candidate: np.ndarray, shape: dict[str, int] | None = None,
            seed: int = 0) -> Scenario:
    """One scenario of the bench JSON from interleaved times (seconds)."""
    ref, cand = stats_ms(reference), stats_ms(candidate)
    ratio = round(float(np.median(candidate) / np.median(reference)), 6)
    return Scenario(ref, cand, ratio, ratio_ci(reference, candidate, seed=seed), dict(shape or {}))


# -- reading ----------------------------------------------------------------------------------------

def bench_from_dict(data: Any, source: str = "bench JSON") -> BenchResult:
    """Parse and check a bench JSON object; a CqilError names the first bad field."""
    if not isinstance(data, dict):
        raise CqilError(f"{source}: expected a JSON object in the {BENCH_FORMAT} layout")
    if data.get("format", BENCH_FORMAT) != BENCH_FORMAT:
        raise CqilError(f"{source}: format '{data.get('format')}' is not {BENCH_FORMAT}")
    scenarios = data.get("scenarios")
    if not isinstance(scenarios, dict) or not scenarios:
        raise CqilError(f"{source}: 'scenarios' must be a non-empty object (e.g. prefill, decode)")
    parsed = {name: _scenario(value, f"{source}: scenarios.{name}") for name, value in scenarios.items()}
    ideal = _number(data.get("ideal_depth_ratio"), f"{source}: ideal_depth_ratio")
    extra = {k: v for k, v in data.items() if k not in ("format", "scenarios", "ideal_depth_ratio")}
    return BenchResult(parsed, ideal, extra)


def _scenario(value: Any, where: str) -> Scenario:
    if not isinstance(value, dict):
        raise CqilError(f"{where}: expected an object with reference, candidate, ratio, ratio_ci")
    stats = {}
    for side in ("reference", "candidate"):
        block = value.get(side)
        if not isinstance(block, dict):
            raise CqilError(f"{where}.{side}: missing (needs p50_ms, p90_ms, p99_ms)")
        stats[side] = Stats(*(_number(block.get(k), f"{where}.{side}.{k}") for k in ("p50_ms", "p90_ms", "p99_ms")),
                            n=int(block.get("n", 0)))
    ci = value.get("ratio_ci")
    if not isinstance(ci, list) or len(ci) != 2:
        raise CqilError(f"{where}.ratio_ci: expected [low, high]")
    low, high = (_number(v, f"{where}.ratio_ci") for v in ci)
    shape = value.get("shape") or {}
    return Scenario(stats["reference"], stats["candidate"], _number(value.get("ratio"), f"{where}.ratio"),
                    (low, high), dict(shape) if isinstance(shape, dict) else {})


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise CqilError(f"{where}: expected a finite non-negative number, found {value!r}")
    return float(value)
