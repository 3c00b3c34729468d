"""A PNG chart of a `cqil bench` result: a p50 bar per row and scenario, its numbers written beside it.

The median is what the bench compares, so the bars are p50 only and the axis is scaled to them; the
p90 is printed next to the median ("p50 ms · p90 ms") rather than drawn as a whisker, which on a
noisy machine runs to several times the bar and squeezes the medians into the left of the plot.
Labels are dark text to the right of the bar, readable on every bar colour.
Same result, same bytes: the Agg backend, fixed size and fonts, and no Software/date metadata.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

ROWS = ("reference", "candidate", "pytorch_reference", "pytorch_candidate")
LABELS = {"reference": "ORT reference", "candidate": "ORT candidate (CQIL)",
          "pytorch_reference": "PyTorch reference", "pytorch_candidate": "PyTorch CQIL"}
COLORS = {"reference": "#4c72b0", "candidate": "#dd8452", "pytorch_reference": "#8da0cb",
          "pytorch_candidate": "#fc8d62"}
LABEL_ROOM = 1.6  # x axis up to 1.6 x the largest median: the text beside the longest bar fits


def _row_stats(scenario: dict[str, Any]) -> dict[str, dict[str, float]]:
    rows = {"reference": scenario["reference"], "candidate": scenario["candidate"]}
    rows.update(scenario.get("rows", {}))
    return {name: rows[name] for name in ROWS if name in rows}


def plot_bench(result: dict[str, Any], path: Path) -> Path:
    """Write the chart of a cqil-bench/1 result to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    scenarios = list(result["scenarios"].items())
    with matplotlib.rc_context({"font.family": "DejaVu Sans", "font.size": 9, "svg.hashsalt": "cqil"}):
        fig, axes = plt.subplots(1, len(scenarios), figsize=(5.5 * len(scenarios), 3.4), squeeze=False)
        for ax, (name, scenario) in zip(axes[0], scenarios):
            rows = _row_stats(scenario)
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
            ax.set_title(f"{name} ({shape})\nCQIL/original {scenario['ratio']:.3f} [{low:.3f}, {high:.3f}], "
                         f"ideal {result['ideal_depth_ratio']:.3f}", fontsize=9)
            for y, row in zip(positions, rows):
                median, p90 = rows[row]["p50_ms"], rows[row]["p90_ms"]
                ax.text(median + max(p50) * 0.02, y, f"{median:.2f} ms · p90 {p90:.2f}", va="center",
                        color="#222222", fontsize=8.5)
        return write_png(fig, path)


def write_png(fig, path: Path) -> Path:
    """Save a matplotlib figure as PNG bytes that depend only on its content (no software tag), atomically."""
    import matplotlib.pyplot as plt
    from cqil.model.fsutil import atomic_write_bytes

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)
