"""A bench result for a person: the printed table and the PNG chart, for every bench that writes
cqil-bench/1 (`cqil bench` on ONNX Runtime with its PyTorch rows, `cqil bench --ranks`).

Rows are the scenario's reference and candidate, under the names the result gives them (`reference_is`,
`candidate_is`; default "reference" and "candidate"), and its extra "rows", in one fixed order.
The chart draws a p50 bar per row and scenario with "p50 ms · p90 ms" written beside it: the median is
what the bench compares, and a p90 whisker on a noisy machine runs to several times the bar and squeezes
the medians into the left of the plot. Same result, same bytes: the Agg backend, fixed size and fonts,
and no Software/date metadata.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from cqil.model.fsutil import atomic_write_bytes

LABELS = {"one_process": "one process", "reference": "ORT reference", "candidate": "ORT candidate (CQIL)",
          "tensor_parallel": "tensor parallel", "cqil": "CQIL per rank", "pytorch_reference": "PyTorch reference",
          "pytorch_candidate": "PyTorch CQIL"}
COLORS = {"one_process": "#8da0cb", "reference": "#4c72b0", "candidate": "#dd8452", "tensor_parallel": "#4c72b0",
          "cqil": "#dd8452", "pytorch_reference": "#8da0cb", "pytorch_candidate": "#fc8d62"}
LABEL_ROOM = 1.6  # x axis up to 1.6 x the largest median: the text beside the longest bar fits


def scenario_rows(result: dict[str, Any], scenario: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every timed row of a scenario by name, in LABELS order."""
    rows = {result.get("reference_is", "reference"): scenario["reference"],
            result.get("candidate_is", "candidate"): scenario["candidate"], **scenario.get("rows", {})}
    return {name: rows[name] for name in LABELS if name in rows}


def _pair(result: dict[str, Any]) -> str:
    return f"{LABELS[result.get('candidate_is', 'candidate')]} / {LABELS[result.get('reference_is', 'reference')]}"


def _versus(stats: dict[str, Any]) -> str:
    if "ratio_to_one_process" in stats:
        return f"  x{stats['ratio_to_one_process']:.3f} of one process"
    if "ratio" in stats:
        return f"  x{stats['ratio']:.3f} of PyTorch reference"
    return ""


def report_lines(result: dict[str, Any], header: str) -> list[str]:
    """The table `cqil bench` prints: `header`, then per scenario each row's percentiles and the ratio."""
    lines = [header]
    for name, scenario in result["scenarios"].items():
        lines.append(f"{name} {scenario['shape']}:")
        for row, stats in scenario_rows(result, scenario).items():
            lines.append(f"  {LABELS[row]:<20} p50 {stats['p50_ms']:9.3f} ms  p90 {stats['p90_ms']:9.3f}  "
                         f"p99 {stats['p99_ms']:9.3f}{_versus(stats)}")
        low, high = scenario["ratio_ci"]
        lines.append(f"  ratio candidate/reference {scenario['ratio']:.3f} [{low:.3f}, {high:.3f}] ({_pair(result)}), "
                     f"ideal depth ratio {result['ideal_depth_ratio']:.3f}")
    if "chart" in result:
        lines.append(f"chart: {result['chart']}")
    return lines


def plot_bench(result: dict[str, Any], path: Path) -> Path:
    """Write the chart of a cqil-bench/1 result to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    scenarios = list(result["scenarios"].items())
    where = f", {result['ranks']} ranks {result['backend']}" if "ranks" in result else ""
    with matplotlib.rc_context({"font.family": "DejaVu Sans", "font.size": 9, "svg.hashsalt": "cqil"}):
        fig, axes = plt.subplots(1, len(scenarios), figsize=(5.5 * len(scenarios), 3.4), squeeze=False)
        for ax, (name, scenario) in zip(axes[0], scenarios):
            rows = scenario_rows(result, scenario)
            p50 = [rows[row]["p50_ms"] for row in rows]
            positions = list(range(len(rows)))
            ax.barh(positions, p50, color=[COLORS[row] for row in rows], height=0.6)
            ax.set_yticks(positions, [LABELS[row] for row in rows])
            ax.invert_yaxis()
            ax.set_xlim(0, max(p50) * LABEL_ROOM)
            ax.set_xlabel("ms, median (p50); p90 printed after it")
            ax.spines[["top", "right"]].set_visible(False)
            shape = ", ".join(f"{k} {v}" for k, v in scenario.get("shape", {}).items())
            low, high = scenario["ratio_ci"]
            ax.set_title(f"{name} ({shape}){where}\n{_pair(result)} {scenario['ratio']:.3f} [{low:.3f}, {high:.3f}], "
                         f"ideal {result['ideal_depth_ratio']:.3f}", fontsize=9)
            for y, row in zip(positions, rows):
                median, p90 = rows[row]["p50_ms"], rows[row]["p90_ms"]
                ax.text(median + max(p50) * 0.02, y, f"{median:.2f} ms · p90 {p90:.2f}", va="center",
                        color="#222222", fontsize=8.5)
        return write_png(fig, path)


def write_png(fig, path: Path) -> Path:
    """Save a matplotlib figure as PNG bytes that depend only on its content (no software tag), atomically;
    the bench chart and scripts/load_test.py's chart use it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)
