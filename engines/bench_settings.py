"""What a latency bench times: `cqil bench`'s settings, and the same on P ranks (`cqil bench --ranks P`).

Kept apart from engines/bench.py (torch, ONNX Runtime) so that the command line is made without them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from cqil.model.settings import NON_NEGATIVE, POSITIVE, check_fields, one_of, setting

# Where the eager PyTorch rows run a group's pieces (engines/bench.py:schedule_models).
SCHEDULES = ("sequential", "streams", "packed")


@dataclass(frozen=True)
class BenchSettings:
    """What `cqil bench` times (its flags, the build's [bench] section, the `--ranks` worker's argv)."""

    batch: int = setting(1, "rows per call (default %(default)s)", check=POSITIVE)
    seq: int = setting(128, "prefill tokens (default %(default)s)", check=POSITIVE)
    past: int = setting(128, "decode context length (default %(default)s)", check=POSITIVE)
    prefill_repeats: int = setting(20, "timed prefill rounds (default %(default)s)", check=POSITIVE,
                                   toml_aliases=("repeats",))
    decode_repeats: int = setting(100, "timed decode rounds (default %(default)s)", check=POSITIVE)
    warmup: int = setting(3, "untimed rounds first (default %(default)s)", check=NON_NEGATIVE)
    # ORT intra-op threads and torch threads; None (0 in TOML): the libraries' default
    threads: int | None = setting(None, "ONNX Runtime and torch threads", check=POSITIVE, unset=0)
    providers: tuple[str, ...] | None = None
    seed: int = 0
    schedule: str = setting("sequential", "where the PyTorch rows run their pieces: sequential, streams (a CUDA "
                            "stream per branch; needs a GPU) or packed (default %(default)s)", check=one_of(*SCHEDULES))

    def __post_init__(self) -> None:
        check_fields(self)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class RankBenchSettings(BenchSettings):
    """`cqil bench`'s settings on P ranks: `threads` are each rank's; the one-process row has its own count."""

    threads: int | None = setting(1, "torch threads of each rank (default %(default)s)",
                                  flags=("--threads", "--rank-threads"), check=POSITIVE, toml=False)
    schedule: str = setting("sequential", "the ranks run CQIL's per-rank schedule", flags=(), toml=False)
    one_process_threads: int | None = setting(None, "threads of the one-process row (default: ranks x --threads)",
                                              check=POSITIVE, toml=False)
