"""Pass limits of engine validation per precision, shared by `cqil validate` and the Polygraphy check scripts."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from cqil.export.contract import ContractSpec
from cqil.model.errors import CqilError


@dataclass(frozen=True)
class Thresholds:
    """Pass limits for one precision; the reference is fp32 PyTorch."""

    logits_atol: float
    logits_rtol: float
    present_atol: float
    present_rtol: float
    min_top1: float  # fraction of positions whose argmax agrees
    max_kl: float  # mean KL(reference || engine) per position, nats

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


# fp32: ORT against PyTorch on SmolLM2-135M differs by ~1e-4 in logits (docs/export.md), so 1e-3 has
# margin while a changed weight (errors ~1e-1 and up) fails. fp16 keeps ~3 significant digits per
# op; over 30 layers logits drift by a few 1e-2, so the fp16 limits lean on top-1 and KL.
DEFAULT_THRESHOLDS = {
    "FLOAT": Thresholds(logits_atol=1e-3, logits_rtol=1e-3, present_atol=1e-3, present_rtol=1e-3,
                        min_top1=0.99, max_kl=1e-4),
    "FLOAT16": Thresholds(logits_atol=0.25, logits_rtol=0.02, present_atol=0.05, present_rtol=0.02,
                          min_top1=0.9, max_kl=0.02),
}

def default_thresholds(spec: ContractSpec) -> Thresholds:
    if spec.kv_dtype not in DEFAULT_THRESHOLDS:
        raise CqilError(f"no validation thresholds for element type {spec.kv_dtype}: export fp32 or fp16")
    return DEFAULT_THRESHOLDS[spec.kv_dtype]

