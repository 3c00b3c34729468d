"""What shapes a recovery run (`cqil finetune`'s flags, the build's [recover] section), apart from
pipeline/recovery.py (torch, peft) so that the command line is made without them."""

from __future__ import annotations

from dataclasses import MISSING, dataclass

from cqil.model.errors import CqilError
from cqil.model.settings import (
    NON_NEGATIVE,
    NON_NEGATIVE_NUMBER,
    POSITIVE,
    POSITIVE_NUMBER,
    Check,
    check_fields,
    number,
    setting,
)
from cqil.pipeline.adapters import DEFAULT_RANK, DEFAULT_TARGETS


def _module_names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


MODULE_NAMES = Check(_module_names, "a list of module names", bool, "must name at least one module")


@dataclass(frozen=True)
class FinetuneSettings:
    """Everything that shapes the loss curve (a resumed run must match it exactly)."""

    steps: int = setting(MISSING, "optimizer steps", check=POSITIVE)
    lr: float = setting(1e-4, "peak learning rate (default %(default)s, official)", check=POSITIVE_NUMBER)
    warmup_steps: int | None = setting(None, "linear warm-up steps (default 5%% of --steps)", check=NON_NEGATIVE)
    weight_decay: float = setting(0.1, "AdamW weight decay (default %(default)s, official)", check=NON_NEGATIVE_NUMBER)
    label_weight: float = setting(0.0, "weight of the text's own next-token cross-entropy, added to the distillation "
                                  "KL (default %(default)s: distillation only)", check=NON_NEGATIVE_NUMBER)
    max_grad_norm: float = setting(1.0, "gradient clipping, 0 = off (default %(default)s; the official run used 0)",
                                   check=NON_NEGATIVE_NUMBER)
    batch_size: int = setting(4, "chunks per batch (default %(default)s)", check=POSITIVE)
    grad_accum: int = setting(1, "micro-batches per step (default %(default)s)", check=POSITIVE)
    seed: int = setting(0, "seed for LoRA init and data order (default %(default)s)", check=NON_NEGATIVE)
    rank: int = setting(DEFAULT_RANK, "LoRA rank r (default %(default)s)", check=POSITIVE)
    alpha: float | None = setting(None, "LoRA alpha (default: = rank)", check=POSITIVE_NUMBER, unset=0.0)
    dropout: float = setting(0.0, "LoRA dropout (default %(default)s)", flags=("--lora-dropout",),
                             check=number(lambda v: 0 <= v < 1, "must be in [0, 1)"))
    targets: tuple[str, ...] = setting(DEFAULT_TARGETS, "modules to adapt in every layer (default %(default)s)",
                                       check=MODULE_NAMES)
    eval_every: int = setting(50, "held-out KL/PPL every K steps, 0 = only at the end (default %(default)s)",
                              check=NON_NEGATIVE)
    eval_chunks: int = setting(16, "held-out chunks per evaluation (default %(default)s)", check=POSITIVE)
    save_every: int = setting(50, "checkpoint every K steps, 0 = never (Ctrl-C still saves)", check=NON_NEGATIVE)
    patience: int = setting(0, "stop after this many held-out points without improvement, 0 = never "
                            "(default %(default)s)", check=NON_NEGATIVE)

    def __post_init__(self) -> None:
        if self.warmup_steps is None:  # 5 % of the steps
            object.__setattr__(self, "warmup_steps", self.steps // 20)
        check_fields(self)

    def check(self, train_chunks: int) -> None:
        """What no single field's check can see: fields together, and the text."""
        if self.patience and not self.eval_every:
            raise CqilError(f"--patience {self.patience} needs held-out points during the run: set --eval-every")
        if train_chunks < self.batch_size:
            raise CqilError(f"the training text gives {train_chunks} chunks, fewer than --batch-size "
                            f"{self.batch_size}: give more text or a shorter --seq-len")
