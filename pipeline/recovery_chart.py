"""The recovery curve as a picture: held-out PPL and KL against the tokens seen, for the build report."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def save_curve(record: dict[str, Any], path: Path, title: str) -> None:
    """Two panels from a run record (`training_run.json`): PPL with the original's as a reference line
    (and 1.10x of it, the default build's target), and KL(original || model), both against tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = record["held_out"]
    tokens = [p["step"] * record["tokens_per_step"] for p in points]
    original = points[-1]["original_ppl"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 5.6), dpi=110, sharex=True)
    top.plot(tokens, [p["ppl"] for p in points], marker="o", label="CQIL + LoRA")
    top.axhline(original, color="gray", linestyle="--", label=f"original {original:.2f}")
    top.axhline(1.1 * original, color="gray", linestyle=":", label="1.10 x original")
    top.set_ylabel("held-out PPL")
    top.legend(fontsize=8)
    bottom.plot(tokens, [p["kl"] for p in points], marker="o", color="tab:red")
    bottom.set_ylabel("KL(original || model)")
    bottom.set_xlabel("training tokens seen")
    if record.get("stopped_early"):
        bottom.annotate("stopped early", (tokens[-1], points[-1]["kl"]), textcoords="offset points",
                        xytext=(-60, 12), fontsize=8)
    top.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})  # no timestamp: same inputs, same bytes
    plt.close(fig)
