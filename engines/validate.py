"""Outputs of every available engine against the PyTorch reference (DESIGN.md section 5).

The reference is the merged CQIL model in PyTorch (fp32), under the plan stored in the ONNX. Each
engine and the reference run the same held-out chunks: a prefill of all but the last few tokens,
then those tokens one at a time, each side chained with its *own* presents (so an engine's cache
errors accumulate as they would in serving). Per output (logits, every present) we record the max
abs and max rel error, and for the logits the top-1 agreement and the mean KL(reference || engine).

Pass rule per precision (`Thresholds`): every element within atol + rtol * |reference| (numpy's
allclose rule, the one polygraphy's Comparator uses with both tolerances), top-1 agreement at least
`min_top1`, mean KL at most `max_kl`, and the engine's held-out perplexity (of the chunks' next
tokens, prefill and decode positions) at most `max_ppl_ratio` times the reference's. For int8/int4
weights only the last three bound anything: an element-wise tolerance means nothing there. For the branch layout the graph must also still have its
branches (`export.check.check_branch_structure`).

Polygraphy is not used: its Comparator feeds every runner the same inputs from one data loader,
while decode here chains each engine's own presents; it has no KL or top-1; and the element-wise
rule above is a few lines of torch. See docs/validate-bench.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from cqil.engines.greedy_agreement import describe as describe_greedy
from cqil.engines.greedy_agreement import greedy_agreement
from cqil.engines.onnxruntime import OrtRunner
from cqil.engines.tensorrt.build import import_tensorrt
from cqil.engines.tensorrt.runner import TensorRTRunner
from cqil.engines.tolerances import QUANTIZED_THRESHOLDS, Thresholds, default_thresholds
from cqil.export.check import check_branch_structure
from cqil.export.contract import (
    LAYOUT_KEY,
    PRECISION_KEY,
    ContractSpec,
    find_onnx,
    output_names,
    read_contract,
)
from cqil.model.cqil import CqilModel
from cqil.model.divergence import Agreement
from cqil.model.errors import CqilError
from cqil.model.steps import Step, forced, prefill_then_decode
from tqdm import tqdm

VALIDATION_FORMAT = "cqil-validation/1"
PRECISION_NAMES = {"FLOAT": "fp32", "FLOAT16": "fp16"}  # files without cqil.precision


# -- comparing tensors ------------------------------------------------------------------------------

class _OutputError:
    """Running max abs / rel error of one output over the steps it is compared at."""

    def __init__(self, atol: float, rtol: float):
        self.atol, self.rtol = atol, rtol
        self.max_abs = 0.0
        self.max_rel = 0.0
        self.worst_excess = -math.inf  # max of |d| - (atol + rtol |ref|); > 0 means an element fails
        self.finite = True

    def add(self, reference: torch.Tensor, actual: torch.Tensor) -> None:
        reference, actual = reference.detach().double().cpu(), actual.detach().double().cpu()
        if reference.shape != actual.shape:
            raise CqilError(f"engine output has shape {tuple(actual.shape)}, the reference "
                            f"{tuple(reference.shape)}: the ONNX is not for this model")
        if actual.numel() == 0:
            return
        if not bool(torch.isfinite(actual).all()):
            self.finite = False
            actual = torch.nan_to_num(actual, nan=math.inf)
        diff = (actual - reference).abs()
        self.max_abs = max(self.max_abs, float(diff.max()))
        # Relative error where the reference is not ~0 (a tiny floor keeps it finite).
        self.max_rel = max(self.max_rel, float((diff / reference.abs().clamp_min(1e-6)).max()))
        self.worst_excess = max(self.worst_excess, float((diff - self.atol - self.rtol * reference.abs()).max()))

    @property
    def passed(self) -> bool:
        return self.finite and self.worst_excess <= 0

    def to_dict(self) -> dict[str, Any]:
        return {"max_abs": _round(self.max_abs), "max_rel": _round(self.max_rel), "passed": self.passed}


class _LogitAgreement(Agreement):
    def add_logits(self, reference: torch.Tensor, actual: torch.Tensor) -> None:
        self.add(F.log_softmax(reference.detach().double().cpu(), -1), F.log_softmax(actual.detach().double().cpu(), -1))

    def to_dict(self) -> dict[str, Any]:
        return {"top1": _round(self.top1), "kl": _round(self.kl), "positions": self.positions}


class _Phase:
    """Errors of every output, and logit agreement, over one phase (prefill or decode)."""

    def __init__(self, names: Sequence[str], thresholds: Thresholds):
        self.thresholds = thresholds
        self.outputs = {name: _OutputError(thresholds.logits_atol, thresholds.logits_rtol) if name == "logits"
                        else _OutputError(thresholds.present_atol, thresholds.present_rtol) for name in names}
        self.agreement = _LogitAgreement()

    def add(self, reference: tuple, actual: tuple) -> None:
        (ref_logits, ref_presents), (logits, presents) = reference, actual
        if len(presents) != len(ref_presents):
            raise CqilError(f"engine returned {len(presents)} presents, the reference {len(ref_presents)}")
        self.agreement.add_logits(ref_logits, logits)
        for name, ref, act in zip(self.outputs, (ref_logits, *ref_presents), (logits, *presents)):
            self.outputs[name].add(ref, act)

    def to_dict(self) -> dict[str, Any]:
        agreement = self.agreement.to_dict()
        failures = [f"{name} max abs {error.max_abs:.3g}" for name, error in self.outputs.items() if not error.passed]
        if agreement["top1"] < self.thresholds.min_top1:
            failures.append(f"top-1 agreement {agreement['top1']:.4f} < {self.thresholds.min_top1}")
        if not agreement["kl"] <= self.thresholds.max_kl:
            failures.append(f"KL {agreement['kl']:.3g} > {self.thresholds.max_kl}")
        presents = [(name, error) for name, error in self.outputs.items() if name != "logits"]
        worst_name, worst = max(presents, key=lambda item: item[1].max_abs)
        return {**agreement, "passed": not failures, "failures": failures,
                "logits": self.outputs["logits"].to_dict(),
                "worst_present": {"name": worst_name, **worst.to_dict()},
                "outputs": {name: error.to_dict() for name, error in self.outputs.items()}}


class _Perplexity:
    """Running mean negative log-likelihood of the next tokens under one side's logits."""

    def __init__(self) -> None:
        self.nll = 0.0
        self.tokens = 0

    def add(self, logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor) -> None:
        logp = F.log_softmax(logits.detach().double().cpu(), -1)
        nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        self.nll += float(nll[keep].sum())
        self.tokens += int(keep.sum())

    @property
    def value(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else math.nan


def _perplexity_result(reference: _Perplexity, engine: _Perplexity, limit: float) -> dict[str, Any]:
    ratio = engine.value / reference.value
    return {"reference": _round(reference.value), "engine": _round(engine.value), "ratio": _round(ratio),
            "tokens": engine.tokens, "passed": bool(ratio <= limit) if math.isfinite(limit) else True}


def _round(value: float) -> float:
    return float(f"{value:.6g}") if math.isfinite(value) else value


# -- running ----------------------------------------------------------------------------------------

def compare_runner(runner: Step, reference: CqilModel, chunks: torch.Tensor, decode_steps: int,
                   thresholds: Thresholds, names: Sequence[str], progress: bool = True,
                   attention_mask: torch.Tensor | None = None) -> dict[str, Any]:
    """Prefill chunks[:, :-decode_steps] then decode the rest token by token, both sides on their own cache.

    `attention_mask` [n, seq] (default all ones) lets the chunks be a left-padded batch of prompts; the
    decoded tokens are real (mask 1).
    """
    prefill_len = chunks.shape[1] - decode_steps
    prompt, decoded = chunks[:, :prefill_len], chunks[:, prefill_len:]
    mask = (torch.ones_like(chunks) if attention_mask is None else attention_mask)[:, :prefill_len]
    phases = {"prefill": _Phase(names, thresholds), "decode": _Phase(names, thresholds)}
    full_mask = torch.ones_like(chunks) if attention_mask is None else attention_mask
    perplexity = (_Perplexity(), _Perplexity())  # reference, engine

    def score(start: int, ref_logits: torch.Tensor, logits: torch.Tensor) -> None:
        targets = chunks[:, start + 1: start + 1 + ref_logits.shape[1]]
        n = targets.shape[1]
        keep = full_mask[:, start:start + n].bool() & full_mask[:, start + 1:start + 1 + n].bool()
        perplexity[0].add(ref_logits[:, :n], targets, keep)
        perplexity[1].add(logits[:, :n], targets, keep)

    pairs = zip(prefill_then_decode(reference, prompt, mask, forced(decoded)),
                prefill_then_decode(runner, prompt, mask, forced(decoded)))
    bar = tqdm(pairs, desc="decode", unit="tok", total=decode_steps + 1, disable=not progress, leave=False)
    for index, (ref_out, out) in enumerate(bar):
        phases["prefill" if index == 0 else "decode"].add(ref_out, out)
        score(0 if index == 0 else prefill_len + index - 1, ref_out[0], out[0])
    result = {name: phase.to_dict() for name, phase in phases.items()}
    result["perplexity"] = _perplexity_result(*perplexity, thresholds.max_ppl_ratio)
    result["passed"] = all(part["passed"] for part in result.values())
    return result


def _check_reference(spec: ContractSpec, reference: CqilModel, onnx_path: Path) -> None:
    if spec.num_layers != reference.num_layers:
        raise CqilError(f"'{onnx_path}' has {spec.num_layers} layers, the reference model "
                        f"{reference.num_layers}: pass the --model it was exported from")
    if (spec.kv_heads, spec.head_dim) != (reference.num_kv_heads, reference.head_dim):
        raise CqilError(f"'{onnx_path}' caches {spec.kv_heads} kv heads x {spec.head_dim}, the reference "
                        f"{reference.num_kv_heads} x {reference.head_dim}: pass the --model it was exported from")
    if spec.plan is not None and (spec.plan.groups, spec.plan.bypass) != (reference.plan.groups, reference.plan.bypass):
        raise CqilError(f"the reference plan ({reference.plan.describe()}) differs from the plan in "
                        f"'{onnx_path}' ({spec.plan.describe()}): validate against the plan it was exported with")


def _structure(spec: ContractSpec, onnx_path: Path) -> dict[str, Any]:
    layout = spec.metadata.get(LAYOUT_KEY)
    if layout != "branches":
        return {"checked": False, "layout": layout, "passed": True,
                "detail": f"not a branch-layout file (layout {layout or 'unknown'})"}
    report = check_branch_structure(onnx_path)
    return {"checked": True, "layout": layout, "passed": report.ok, "detail": report.describe()}


def validate_onnx(onnx_dir: Path, reference: CqilModel, chunks: torch.Tensor, decode_steps: int = 4,
                  thresholds: Thresholds | None = None, engine: Path | None = None, threads: int | None = None,
                  providers: Sequence[str] | None = None, progress: bool = True,
                  attention_mask: torch.Tensor | None = None,
                  greedy_prompts: Sequence[torch.Tensor] = ()) -> dict[str, Any]:
    """Validate the exported model (and a TensorRT engine, if given and TensorRT imports) against `reference`.

    `chunks` [n, seq] int64 of held-out text; the last `decode_steps` tokens of each are decoded.
    `attention_mask` [n, seq] of 0/1 (0 = left padding, never among the decoded tokens) makes the
    chunks a padded batch; by default every token is real. Every position is compared, padding too:
    both sides compute the same masked rows. `greedy_prompts` (token ids [1, n] each): for an int8/int4
    file, the greedy tokens of ONNX Runtime and the reference on them are compared too (reported, not a
    pass condition: engines/greedy_agreement.py). Returns the JSON-able result; `result["passed"]` is the verdict.
    """
    onnx_path = find_onnx(Path(onnx_dir))
    spec = read_contract(onnx_path)
    _check_reference(spec, reference, onnx_path)
    if chunks.dim() != 2 or chunks.dtype != torch.long:
        raise CqilError(f"validation chunks must be int64 [n, seq], got {chunks.dtype} {tuple(chunks.shape)}")
    if not 1 <= decode_steps < chunks.shape[1]:
        raise CqilError(f"--decode-steps {decode_steps} must be at least 1 and below the chunk length "
                        f"{chunks.shape[1]}")
    if attention_mask is not None and (attention_mask.shape != chunks.shape
                                       or not bool(attention_mask[:, -decode_steps:].eq(1).all())):
        raise CqilError(f"attention_mask {tuple(attention_mask.shape)} must have the chunks' shape "
                        f"{tuple(chunks.shape)} and 1 on the {decode_steps} decoded tokens of every row")
    limits = thresholds or default_thresholds(spec)
    names = output_names(spec.num_layers)
    ort_runner = OrtRunner(onnx_path, providers=providers, threads=threads)
    engines: dict[str, Any] = {}
    runners: dict[str, Step] = {"onnxruntime": ort_runner}
    notes = []
    if engine is not None:
        if import_tensorrt() is None:
            notes.append(f"TensorRT is not installed here: engine '{engine}' was not validated")
            engines["tensorrt"] = {"skipped": "TensorRT not installed", "engine": str(engine)}
        else:
            runners["tensorrt"] = TensorRTRunner(Path(engine), spec)
    reference.eval()
    for name, runner in runners.items():
        engines[name] = compare_runner(runner, reference, chunks, decode_steps, limits, names, progress,
                                       attention_mask)
    engines["onnxruntime"]["providers"] = ort_runner.session.get_providers()
    precision = spec.metadata.get(PRECISION_KEY) or PRECISION_NAMES.get(spec.kv_dtype, spec.kv_dtype)
    if greedy_prompts and precision in QUANTIZED_THRESHOLDS:
        engines["onnxruntime"]["greedy"] = greedy_agreement(reference, ort_runner, greedy_prompts)
    structure = _structure(spec, onnx_path)
    ran = [result for result in engines.values() if "skipped" not in result]
    return {
        "format": VALIDATION_FORMAT,
        "onnx": str(onnx_path),
        "precision": precision,
        "plan": reference.plan.to_dict(),
        "source_model": spec.source_model(),
        "data": {"chunks": int(chunks.shape[0]), "seq_len": int(chunks.shape[1]),
                 "prefill_tokens": int(chunks.shape[1] - decode_steps), "decode_steps": decode_steps},
        "thresholds": limits.to_dict(),
        "structure": structure,
        "engines": engines,
        "notes": notes,
        "passed": structure["passed"] and all(result["passed"] for result in ran),
    }


def summary_lines(result: dict[str, Any]) -> list[str]:
    """A human summary of a validation result, one line per engine and phase."""
    data = result["data"]
    header = (f"{result['onnx']} ({result['precision']}) vs PyTorch reference, {data['chunks']} chunks x "
              f"{data['seq_len']} tokens ({data['decode_steps']} decoded with the cache)")
    lines = [header]
    for name, engine in result["engines"].items():
        if "skipped" in engine:
            lines.append(f"  {name}: skipped ({engine['skipped']})")
            continue
        for phase in ("prefill", "decode"):
            p = engine[phase]
            worst = p["worst_present"]
            failures = f"  [{'; '.join(p['failures'])}]" if p["failures"] else ""
            lines.append(f"  {name} {phase}: {'ok' if p['passed'] else 'FAIL'}  max|dlogits| "
                         f"{p['logits']['max_abs']:.3g} (rel {p['logits']['max_rel']:.3g}), worst present "
                         f"{worst['name']} {worst['max_abs']:.3g}, top-1 {p['top1']:.4f}, KL {p['kl']:.3g}{failures}")
        ppl = engine["perplexity"]
        lines.append(f"  {name} held-out perplexity {ppl['engine']:.4g} vs reference {ppl['reference']:.4g} "
                     f"({ppl['ratio']:.4f}x over {ppl['tokens']} tokens): {'ok' if ppl['passed'] else 'FAIL'}")
        if "greedy" in engine:
            lines.append(f"  {name} {describe_greedy(engine['greedy'])}")
    structure = result["structure"]
    lines.append(f"  structure: {structure['detail']}")
    lines.extend(f"  note: {note}" for note in result["notes"])
    lines.append(f"validation {'passed' if result['passed'] else 'FAILED'}")
    return lines
