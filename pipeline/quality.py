"""Quality of CQIL models against the original: held-out perplexity, KL(original || model), top-1 agreement."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from cqil.engines.runner import ContractRunner
from cqil.export.contract import PRECISION_KEY
from cqil.model.cqil import CqilModel
from cqil.model.divergence import Agreement
from cqil.model.errors import CqilError
from cqil.model.plan import Plan
from tqdm import tqdm


class _Totals:
    def __init__(self) -> None:
        self.nll = 0.0
        self.predicted = 0  # next-token predictions (for perplexity)
        self.agreement = Agreement()  # against the original (KL and top-1)

    def add(self, log_probs: torch.Tensor, targets: torch.Tensor, reference: torch.Tensor | None) -> None:
        nll = F.nll_loss(log_probs[:, :-1].flatten(0, 1), targets[:, 1:].flatten(), reduction="sum")
        self.nll += float(nll)
        self.predicted += targets[:, 1:].numel()
        if reference is not None:
            self.agreement.add(reference, log_probs)

    def result(self) -> dict[str, float]:
        out = {"ppl": math.exp(self.nll / self.predicted), "nll": self.nll / self.predicted}
        if self.agreement.positions:
            out.update(kl=self.agreement.kl, top1=self.agreement.top1)
        return out


@torch.no_grad()
def evaluate(original: CqilModel, candidates: Mapping[str, CqilModel], chunks: torch.Tensor,
             batch_size: int = 4, progress: bool = True) -> dict:
    """Metrics of the original and of each candidate on the same held-out chunks, in one pass.

    KL and top-1 compare each candidate's next-token distribution with the original's at every
    position; perplexity scores each model on the text itself.
    """
    totals = {"original": _Totals(), **{name: _Totals() for name in candidates}}
    start = time.perf_counter()
    batches = torch.split(chunks, batch_size)
    for batch in tqdm(batches, desc="eval", unit="batch", disable=not progress, leave=False):
        reference = F.log_softmax(original(batch)[0].float(), -1)
        totals["original"].add(reference, batch, None)
        for name, model in candidates.items():
            totals[name].add(F.log_softmax(model(batch)[0].float(), -1), batch, reference)
    seconds = time.perf_counter() - start
    tokens = chunks.numel()
    result = {name: total.result() for name, total in totals.items()}
    result["tokens"] = tokens
    result["seconds"] = round(seconds, 2)
    result["tokens_per_s"] = round(tokens * len(totals) / seconds, 1)
    return result


def at_precision(onnx_dir: Path, original_source: Path, plan: Plan) -> dict[str, ContractRunner]:
    """`evaluate` candidates for an exported CQIL folder at its precision and the original model exported at the
    same precision (the same int8/int4 quantization; cached, `pipeline.reference`), run by ONNX Runtime.

    Keys `original_<precision>` and `cqil_<precision>`, so that a table puts both next to the fp32 rows and
    the cost of the precision shows on each side. Empty for an fp32 folder (the PyTorch rows say it all).
    """
    from cqil.engines.onnxruntime import OrtRunner
    from cqil.export.contract import find_onnx, read_contract
    from cqil.pipeline.reference import cached_reference

    onnx_path = find_onnx(Path(onnx_dir))
    spec = read_contract(onnx_path)
    if spec.plan is not None and (spec.plan.groups, spec.plan.bypass) != (plan.groups, plan.bypass):
        raise CqilError(f"'{onnx_path}' was exported under {spec.plan.describe()}, not the plan evaluated here "
                        f"({plan.describe()}): pass the plan it was exported with")
    precision = spec.metadata.get(PRECISION_KEY) or "fp32"
    if precision == "fp32":
        return {}
    reference = cached_reference(spec, onnx_path, model=original_source)
    return {f"original_{precision}": OrtRunner(reference), f"cqil_{precision}": OrtRunner(onnx_path)}
