"""The latency gate: pass or fail a bench result, for CI.

Two rules, one per run:
  --max-ratio R       every scenario's ratio (candidate p50 / reference p50) must be <= R;
  --baseline OLD.json every scenario of the baseline must be in the new bench with a ratio
                      <= baseline ratio x (1 + tolerance).
Ratios, not milliseconds, are compared: both sides of a ratio ran interleaved on the same machine,
so a baseline recorded on one CI runner stays meaningful on another.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cqil.engines.latency import BenchResult, bench_from_dict
from cqil.model.errors import CqilError
from cqil.model.fsutil import read_json

DEFAULT_TOLERANCE = 0.05


@dataclass(frozen=True)
class Check:
    scenario: str
    ratio: float
    limit: float
    detail: str

    @property
    def passed(self) -> bool:
        return self.ratio <= self.limit


def load_bench(path: Path) -> BenchResult:
    data = read_json(path, "bench file", "run `cqil bench --json` first")
    return bench_from_dict(data, str(path))


def check_max_ratio(bench: BenchResult, max_ratio: float) -> list[Check]:
    if not max_ratio > 0:
        raise CqilError(f"--max-ratio {max_ratio} must be positive")
    return [Check(name, s.ratio, max_ratio, f"ratio {s.ratio:.4f} (CI {s.ratio_ci[0]:.4f}-{s.ratio_ci[1]:.4f}) "
                  f"vs limit {max_ratio:.4f}") for name, s in bench.scenarios.items()]


def check_baseline(bench: BenchResult, baseline: BenchResult, tolerance: float = DEFAULT_TOLERANCE) -> list[Check]:
    if not tolerance >= 0:
        raise CqilError(f"--tolerance {tolerance} must be 0 or more")
    missing = sorted(set(baseline.scenarios) - set(bench.scenarios))
    if missing:
        raise CqilError(f"the bench lacks scenario(s) {', '.join(missing)} that the baseline has: "
                        "bench the same scenarios or record a new baseline")
    checks = []
    for name, old in baseline.scenarios.items():
        new = bench.scenarios[name]
        limit = old.ratio * (1 + tolerance)
        checks.append(Check(name, new.ratio, limit, f"ratio {new.ratio:.4f} vs baseline {old.ratio:.4f} "
                            f"(+{tolerance:.0%} allowed: <= {limit:.4f})"))
    return checks


def gate_result(checks: list[Check], rule: str) -> dict[str, Any]:
    return {"passed": all(c.passed for c in checks), "rule": rule,
            "checks": [{"scenario": c.scenario, "ratio": c.ratio, "limit": round(c.limit, 6),
                        "passed": c.passed, "detail": c.detail} for c in checks]}


def junit_xml(checks: list[Check], rule: str) -> str:
    """A JUnit report: one test case per scenario, a <failure> for each failed one."""
    failures = sum(not c.passed for c in checks)
    suites = ET.Element("testsuites", name="cqil-gate", tests=str(len(checks)), failures=str(failures))
    suite = ET.SubElement(suites, "testsuite", name=f"cqil-gate ({rule})", tests=str(len(checks)),
                          failures=str(failures), errors="0", skipped="0")
    for check in checks:
        case = ET.SubElement(suite, "testcase", classname="cqil.latency", name=check.scenario)
        if not check.passed:
            failure = ET.SubElement(case, "failure", message=f"{check.scenario}: {check.detail}", type="LatencyRegression")
            failure.text = check.detail
        else:
            ET.SubElement(case, "system-out").text = check.detail
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"
