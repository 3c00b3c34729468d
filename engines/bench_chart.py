"""A PNG chart of a `cqil bench` result: p50 per row and scenario, p90 as the error bar.

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


def _row_stats(scenario: dict[str, Any]) -> dict[str, dict[str, float]]:
    rows = {"reference": scenario["reference"], "candidate": scenario["candidate"]}
    rows.update(scenario.get("rows", {}))
    return {name: rows[name] for name in ROWS if name in rows}


def plot_bench(result: dict[str, Any], path: Path) -> Path:
    """Write the chart of a cqil-bench/1 result to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from pipeline.model.fsutil import atomic_write_bytes

    scenarios = list(result["scenarios"].items())
    with matplotlib.rc_context({"font.family": "DejaVu Sans", "font.size": 9, "svg.hashsalt": "cqil"}):
        fig, axes = plt.subplots(1, len(scenarios), figsize=(5 * len(scenarios), 3.2), squeeze=False)
        for ax, (name, scenario) in zip(axes[0], scenarios):
            rows = _row_stats(scenario)
            labels = [LABELS[row] for row in rows]
            p50 = [rows[row]["p50_ms"] for row in rows]
            p90 = [rows[row]["p90_ms"] - rows[row]["p50_ms"] for row in rows]
            positions = range(len(rows))
            ax.barh(positions, p50, xerr=[[0] * len(rows), p90], color=[COLORS[row] for row in rows],
                    capsize=3)
            ax.set_yticks(list(positions), labels)
            ax.invert_yaxis()
            ax.set_xlabel("ms (bar p50, whisker p90)")
            shape = ", ".join(f"{k} {v}" for k, v in scenario.get("shape", {}).items())
            low, high = scenario["ratio_ci"]
            ax.set_title(f"{name} ({shape})\nCQIL/original {scenario['ratio']:.3f} [{low:.3f}, {high:.3f}], "
                         f"ideal {result['ideal_depth_ratio']:.3f}", fontsize=9)
            for y, value in zip(positions, p50):
                ax.text(value * 0.02, y, f"{value:.2f} ms", va="center", color="white", fontsize=8)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
        plt.close(fig)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)
