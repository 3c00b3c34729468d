"""Pass limits of engine validation per precision, shared by `cqil validate` and the Polygraphy check scripts."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from cqil.export.contract import PRECISION_KEY, ContractSpec
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
    max_ppl_ratio: float = math.inf  # held-out perplexity of the engine / of the reference

    def to_dict(self) -> dict[str, float | None]:
        return {name: value if math.isfinite(value) else None for name, value in asdict(self).items()}


# fp32: ORT against PyTorch on SmolLM2-135M differs by ~1e-4 in logits (docs/export.md), so 1e-3 has
# margin while a changed weight (errors ~1e-1 and up) fails. fp16 keeps ~3 significant digits per
# op; over 30 layers logits drift by a few 1e-2, so the fp16 limits lean on top-1 and KL.
DEFAULT_THRESHOLDS = {
    "FLOAT": Thresholds(logits_atol=1e-3, logits_rtol=1e-3, present_atol=1e-3, present_rtol=1e-3,
                        min_top1=0.99, max_kl=1e-4),
    "FLOAT16": Thresholds(logits_atol=0.25, logits_rtol=0.02, present_atol=0.05, present_rtol=0.02,
                          min_top1=0.9, max_kl=0.02),
}

# int8/int4 weights (MatMulNBits, int8 activations at accuracy level 4): no element-wise bound means
# anything, so the limits are on the distribution (issue 18's goals: int4 top-1 >= 0.95 and held-out
# perplexity within 1.10x of fp32; int8 is held closer on KL and perplexity). Measured on the default
# build's CQIL SmolLM2 (docs/export.md): int8 KL 0.005, top-1 0.959, 1.005x; int4 with the default recipe
# (8-bit lm_head/q/k/v/o/down) KL 0.07, 1.07x but top-1 0.835: it fails on top-1, all-4-bit RTN 1.29x too.
QUANTIZED_THRESHOLDS = {
    "int8": Thresholds(logits_atol=math.inf, logits_rtol=0.0, present_atol=math.inf, present_rtol=0.0,
                       min_top1=0.95, max_kl=0.02, max_ppl_ratio=1.03),
    "int4": Thresholds(logits_atol=math.inf, logits_rtol=0.0, present_atol=math.inf, present_rtol=0.0,
                       min_top1=0.95, max_kl=0.1, max_ppl_ratio=1.10),
}


def default_thresholds(spec: ContractSpec) -> Thresholds:
    precision = spec.metadata.get(PRECISION_KEY)
    if precision in QUANTIZED_THRESHOLDS:
        return QUANTIZED_THRESHOLDS[precision]
    if spec.kv_dtype not in DEFAULT_THRESHOLDS:
        raise CqilError(f"no validation thresholds for element type {spec.kv_dtype}: export fp32 or fp16")
    return DEFAULT_THRESHOLDS[spec.kv_dtype]

