"""scripts/gpu_bench.py in its CPU smoke-test mode: every variant runs, agrees with the sequential model, and is reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_bench_quick_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_bench.py"), "--device", "cpu", "--quick",
         "--repeats", "3", "--warmup", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    seen = {(r["model"], r["p"], r["variant"]) for r in rows}
    assert seen == {(m, p, v) for m in ("tiny-smollm2", "tiny-llama") for p in (2, 4)
                    for v in ("baseline", "sequential", "packed")}  # streams need CUDA
    for r in rows:
        assert r["max_diff"] < 1e-5  # packed computes the sequential CQIL model
        assert r["median_ms"] > 0 and r["ratio_ci"][0] <= r["ratio_ci"][1]
    tiny = {(r["p"], r["variant"]): r for r in rows if r["model"] == "tiny-smollm2"}
    assert tiny[(2, "packed")]["depth"] == 5 and tiny[(2, "packed")]["ideal_depth_ratio"] == 0.625  # 2 + 6/2 of 8
    assert tiny[(4, "packed")]["ideal_depth_ratio"] == 0.5  # 2 + ceil(6/4) of 8
    assert tiny[(2, "baseline")]["ratio"] == 1.0
    assert "median ms" in result.stdout and "ideal" in result.stdout
