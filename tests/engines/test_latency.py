"""Latency helpers: interleaving, percentiles against numpy, the bootstrap ratio interval, the bench JSON."""

from __future__ import annotations

import numpy as np
import pytest
from cqil.engines import latency
from cqil.model.errors import CqilError


def test_interleaved_times_runs_round_robin_after_warmup():
    order = []
    clock = {"t": 0.0}

    def make(name, cost):
        def fn():
            order.append(name)
            clock["t"] += cost
        return fn

    syncs = []
    times = latency.interleaved_times({"ref": make("ref", 1), "cand": make("cand", 2)}, repeats=4, warmup=2,
                                      synchronize=lambda: syncs.append(1))
    assert order == ["ref", "cand"] * 6  # 2 warm-up rounds, then 4 timed rounds, alternating
    assert set(times) == {"ref", "cand"} and all(len(t) == 4 for t in times.values())
    assert len(syncs) == 1 + 8  # after warm-up, then after every timed call
    with pytest.raises(CqilError):
        latency.interleaved_times({"a": lambda: None}, repeats=0)


def test_interleaved_times_calls_hooks_around_each_call_inside_the_clock(monkeypatch):
    """before(name), the call, synchronize, after(name) — the clock reads after before and after after."""
    events = []
    clock = iter(range(1000))

    def perf_counter():
        tick = next(clock)
        events.append("clock")
        return tick

    monkeypatch.setattr(latency.time, "perf_counter", perf_counter)
    times = latency.interleaved_times({"a": lambda: events.append("a"), "b": lambda: events.append("b")},
                                      repeats=2, warmup=1, synchronize=lambda: events.append("sync"),
                                      before=lambda name: events.append(f"before {name}"),
                                      after=lambda name: events.append(f"after {name}"))
    call = lambda name: ["before " + name, "clock", name, "sync", "after " + name, "clock"]
    warm = ["before a", "a", "after a", "before b", "b", "after b", "sync"]
    assert events == warm + (call("a") + call("b")) * 2  # interleaved a b a b, hooks inside every timed call
    assert all(list(t) == [1.0, 1.0] for t in times.values())  # start and stop read one tick apart per call


def test_stats_are_numpy_percentiles_in_ms():
    seconds = np.random.default_rng(3).gamma(2.0, 0.01, size=257)
    stats = latency.stats_ms(seconds)
    want = np.percentile(seconds * 1000, [50, 90, 99])
    assert stats.n == 257
    assert [stats.p50_ms, stats.p90_ms, stats.p99_ms] == pytest.approx(want, abs=1e-6)


def test_ratio_ci_contains_the_ratio_and_is_deterministic():
    rng = np.random.default_rng(7)
    reference = 0.010 + rng.normal(0, 0.0005, 200)
    candidate = 0.007 + rng.normal(0, 0.0005, 200)
    scenario = latency.compare(reference, candidate, {"batch": 1, "seq": 1, "past": 64})
    low, high = scenario.ratio_ci
    assert scenario.ratio == pytest.approx(np.median(candidate) / np.median(reference), abs=1e-6)
    assert low < scenario.ratio < high and high - low < 0.05
    assert 0.65 < low and high < 0.75  # the true ratio is 0.7
    assert latency.ratio_ci(reference, candidate) == (low, high)  # fixed seed: same interval
    assert latency.ratio_ci(reference, candidate, seed=1) != (low, high)
    with pytest.raises(CqilError):
        latency.ratio_ci(reference, candidate[:10])


def test_bench_json_round_trip_and_bad_fields():
    rng = np.random.default_rng(0)
    scenario = latency.compare(rng.uniform(1, 2, 50), rng.uniform(1, 2, 50))
    result = latency.BenchResult({"decode": scenario}, ideal_depth_ratio=0.6, extra={"engine": "onnxruntime-cpu"})
    data = result.to_dict()
    assert data["format"] == "cqil-bench/1" and data["engine"] == "onnxruntime-cpu"
    assert set(data["scenarios"]["decode"]) == {"shape", "reference", "candidate", "ratio", "ratio_ci"}
    assert latency.bench_from_dict(data).to_dict() == data
    broken = {**data, "scenarios": {"decode": {**data["scenarios"]["decode"], "ratio": "fast"}}}
    with pytest.raises(CqilError, match="scenarios.decode.ratio"):
        latency.bench_from_dict(broken)
    with pytest.raises(CqilError, match="scenarios"):
        latency.bench_from_dict({"ideal_depth_ratio": 0.5})


def test_ratio_ci_is_a_95_percent_interval():
    """Checked against an independent bootstrap (another generator, many more resamples): a 90 % interval
    would be clearly narrower."""
    rng = np.random.default_rng(123)
    reference = rng.lognormal(0.0, 0.3, 40)
    candidate = reference * rng.lognormal(-0.1, 0.3, 40)
    rounds = np.random.default_rng(7).integers(0, 40, size=(40_000, 40))
    ratios = np.median(candidate[rounds], axis=1) / np.median(reference[rounds], axis=1)
    expected95, expected90 = np.percentile(ratios, (2.5, 97.5)), np.percentile(ratios, (5, 95))
    low, high = latency.ratio_ci(reference, candidate, resamples=20_000)
    width = expected95[1] - expected95[0]
    assert abs(low - expected95[0]) < 0.05 * width and abs(high - expected95[1]) < 0.05 * width
    assert (expected95[1] - expected95[0]) - (expected90[1] - expected90[0]) > 0.15 * width  # the test can tell
