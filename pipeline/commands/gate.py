"""`cqil gate`: pass or fail a bench result against a baseline or a ratio limit (exit 0 pass, 1 fail, 2 bad input)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cqil.model.errors import CqilError
from cqil.model.fsutil import atomic_write_text
from cqil.pipeline.commands.options import INPUT_FILE, NON_NEGATIVE_NUMBER, OUTPUT_FILE, POSITIVE_NUMBER


def cmd_gate(args: argparse.Namespace) -> int:
    from cqil.engines import gate  # numpy (engines/latency.py): not at `cqil --help`

    checks, rule = run(args.bench, args.baseline, args.max_ratio, args.tolerance)
    result = gate.gate_result(checks, rule)
    # The reports first: a verdict is printed only once everything it promises is on disk.
    if args.junit:
        atomic_write_text(args.junit, gate.junit_xml(checks, rule))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    for check in checks:
        print(f"{'PASS' if check.passed else 'FAIL'} {check.scenario}: {check.detail}")
    print(f"gate {'passed' if result['passed'] else 'FAILED'} ({rule})")
    return 0 if result["passed"] else 1


def run(bench: Path, baseline: Path | None = None, max_ratio: float | None = None,
        tolerance: float | None = None) -> tuple[list, str]:
    """The checks of the bench result at `bench` against a `baseline` result (within `tolerance`) or a
    `max_ratio`, and the rule they applied, as `cqil gate` words it."""
    from cqil.engines import gate

    if tolerance is not None and baseline is None:
        raise CqilError("--tolerance applies only with --baseline")
    result = gate.load_bench(bench)
    if baseline is not None:
        tolerance = gate.DEFAULT_TOLERANCE if tolerance is None else tolerance
        return (gate.check_baseline(result, gate.load_bench(baseline), tolerance),
                f"baseline {baseline} tolerance {tolerance:g}")
    if max_ratio is None:
        raise CqilError("give --baseline or --max-ratio")
    return gate.check_max_ratio(result, max_ratio), f"max ratio {max_ratio:g}"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gate", help="pass/fail a bench result against a baseline or a ratio limit "
                       "(exit 0 pass, 1 fail, 2 bad input)")
    p.add_argument("bench", type=INPUT_FILE, help="bench JSON (cqil-bench/1)")
    rule = p.add_mutually_exclusive_group(required=True)
    rule.add_argument("--baseline", type=INPUT_FILE, help="an earlier bench JSON to compare ratios with")
    rule.add_argument("--max-ratio", type=POSITIVE_NUMBER, help="largest allowed candidate/reference ratio")
    p.add_argument("--tolerance", type=NON_NEGATIVE_NUMBER, default=None,
                   help="with --baseline: allowed relative ratio increase (default 0.05)")
    p.add_argument("--junit", type=OUTPUT_FILE, help="write a JUnit XML report here")
    p.add_argument("--json", type=OUTPUT_FILE, help="write the gate result as JSON here")
    p.set_defaults(func=cmd_gate)
