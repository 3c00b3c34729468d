"""How far one next-token distribution is from another: per-token KL and top-1 agreement, written once.

Quality (held-out eval), plan search (calibration KL), recovery (the distillation loss) and engine
validation all compare a model's next-token distribution with a reference's at every position.
"""

from __future__ import annotations

import torch


def token_kl(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(reference || other) at every position, from log-probabilities [..., vocab]."""
    return (reference.exp() * (reference - other)).sum(-1)


class Agreement:
    """Running mean KL(reference || other) and top-1 agreement over positions."""

    def __init__(self) -> None:
        self.kl_sum = 0.0
        self.agree = 0
        self.positions = 0

    def add(self, reference: torch.Tensor, other: torch.Tensor) -> None:
        """Log-probabilities [..., vocab] of the reference and the compared model at the same positions."""
        kl = token_kl(reference, other)
        self.kl_sum += float(kl.double().sum())
        self.agree += int((reference.argmax(-1) == other.argmax(-1)).sum())
        self.positions += kl.numel()

    @property
    def kl(self) -> float:
        return self.kl_sum / self.positions

    @property
    def top1(self) -> float:
        return self.agree / self.positions
