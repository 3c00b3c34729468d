"""The Markdown table of a latency-budget search's Pareto frontier (docs/autoplan.md), from its JSON.

    python scripts/frontier_table.py plan.pareto.json

One row per budget: for prune-only, CQIL-only and hybrid, the plan (dropped layers, groups), its predicted and
(where `--measure-latency` ran) measured latency ratio, its calibration KL and its held-out KL; and whether the
hybrid's held-out KL is at most both others' (the goal in docs/autoplan.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

KINDS = ("prune", "cqil", "hybrid")


def describe(point: dict) -> str:
    parts = []
    if point["dropped"]:
        parts.append(f"drop {','.join(map(str, point['dropped']))}")
    if point["groups"]:
        parts.append(f"pairs {','.join(f'{g[0]}-{g[-1]}' for g in point['groups'])}")
    return "; ".join(parts) or "original"


def ratio(point: dict) -> str:
    measured = point.get("measured_ratio")
    return f"{point['predicted_ratio']:.3f}" + (f" / {measured:.3f}" if measured is not None else "")


def table(frontier: dict) -> list[str]:
    by_budget: dict[float, dict[str, dict]] = {}
    for kind in KINDS:
        for point in frontier["kinds"].get(kind, []):
            by_budget.setdefault(point["budget"], {})[kind] = point
    lines = ["| budget R | kind | plan | latency ratio: predicted / measured | calib. KL | held-out KL |",
             "|---|---|---|---:|---:|---:|"]
    verdicts = []
    for budget, points in sorted(by_budget.items()):
        for kind in KINDS:
            point = points.get(kind)
            if point is None:
                lines.append(f"| {budget} | {kind} | no plan fits | | | |")
                continue
            calibration = point.get("calibration_kl")  # cqil-pareto/1 files lack it
            lines.append(f"| {budget} | {kind} | {describe(point)} | {ratio(point)} | "
                         f"{'-' if calibration is None else f'{calibration:.4f}'} | {point['held_out']['kl']:.4f} |")
        hybrid = points.get("hybrid")
        others = [points[k]["held_out"]["kl"] for k in ("prune", "cqil") if k in points]
        if hybrid is not None:
            verdicts.append(f"R = {budget}: hybrid {hybrid['held_out']['kl']:.4f} <= "
                            f"{' and '.join(f'{v:.4f}' for v in others) or 'nothing else fits'}: "
                            f"{all(hybrid['held_out']['kl'] <= v + 1e-12 for v in others)}")
    return lines + [""] + verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("frontier", type=Path, help="plan.pareto.json written by `cqil plan --latency-budget`")
    args = parser.parse_args()
    print("\n".join(table(json.loads(args.frontier.read_text()))))


if __name__ == "__main__":
    main()
