"""What a user asks of a TensorRT engine: precision, shape ranges, builder limits.

`cqil engine`'s flags and the build's [engines] section are generated from these fields
(pipeline/settings.py). Torch-free and TensorRT-free, so that `cqil --help` shows them quickly and
options are made and checked on any machine; settings.py resolves them against the ONNX.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cqil.model.errors import CqilError
from cqil.model.settings import NON_NEGATIVE, OUTPUT_FILE, POSITIVE, check_fields, one_of, setting

PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class EngineOptions:
    """`cqil engine`'s options (the build's [engines] section: all but the per-machine ones)."""

    precision: str = setting("fp32", f"engine precision: {', '.join(PRECISIONS)} (default %(default)s)",
                             check=one_of(*PRECISIONS), metavar="{" + ",".join(PRECISIONS) + "}")
    aux_streams: int | None = setting(None, "max_aux_streams (default: largest group size - 1, from the ONNX plan "
                                      "metadata)", check=NON_NEGATIVE, toml=False)
    opt_batch: int = setting(1, "rows the engine is tuned for (default %(default)s)", check=POSITIVE)
    max_batch: int = setting(1, "most rows (default %(default)s)", check=POSITIVE)
    opt_seq: int = setting(128, "prefill tokens the engine is tuned for (default %(default)s)", check=POSITIVE)
    max_seq: int = setting(512, "most prefill tokens (default %(default)s)", check=POSITIVE)
    opt_past: int = setting(256, "decode cache length the engine is tuned for (default %(default)s)", check=POSITIVE)
    max_context: int = setting(1024, "most past + new tokens: the attention window the engine accepts "
                               "(default %(default)s)", check=POSITIVE)
    workspace_mib: int | None = setting(None, "builder workspace limit", check=POSITIVE, toml=False)
    timing_cache: Path | None = setting(None, "timing cache file (default: timing.cache beside the engine)",
                                        check=OUTPUT_FILE, toml=False)

    def __post_init__(self) -> None:
        check_fields(self)
        for low, high, what in ((self.opt_batch, self.max_batch, "batch"), (self.opt_seq, self.max_seq, "seq"),
                                (self.opt_past, self.max_context - 1, "past")):
            if not 1 <= low <= high:
                raise CqilError(f"{what} range: need 1 <= opt {low} <= max {high} "
                                "(check --opt-/--max- options; max past is --max-context minus 1)")
        if self.max_seq > self.max_context:
            raise CqilError(f"--max-seq {self.max_seq} exceeds --max-context {self.max_context}")
