"""`report.md` of a build: what was built, how good it is, how fast, and what was skipped and why."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cqil.pipeline.build_config import SERVE_BASIS
from cqil.pipeline.manifest import library_versions
from cqil.pipeline.stages import StageResult


def _load(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _quality_rows(quality: dict, plan_label: str) -> list[str]:
    """Original / the paper-style plan of the same depth / the shipped plan, before and after recovery."""
    uniform = quality.get("plans", {}).get("cqil_uniform", "")
    labels = {"original": "original", "cqil_uniform": f"CQIL uniform {uniform} (no recovery)",
              "cqil": f"CQIL {plan_label} (no recovery)", "cqil_recovered": f"CQIL {plan_label} + recovery (merged)"}
    for precision in ("fp16", "int8", "int4"):  # the exported file and the original at its precision (ONNX Runtime)
        labels[f"original_{precision}"] = f"original, {precision} export"
        labels[f"cqil_{precision}"] = f"CQIL {plan_label}, {precision} export (shipped)"
    rows = ["| model | PPL | PPL / original | KL(original ‖ model) | top-1 agreement |", "|---|---:|---:|---:|---:|"]
    original = quality["original"]["ppl"]
    for key, label in labels.items():
        if key in quality:
            row = quality[key]
            kl = f"{row['kl']:.4f}" if "kl" in row else "–"
            top1 = f"{row['top1']:.3f}" if "top1" in row else "–"
            rows.append(f"| {label} | {row['ppl']:.3f} | {row['ppl'] / original:.3f} | {kl} | {top1} |")
    return rows


def _recovery_lines(build_dir: Path) -> list[str]:
    record = _load(build_dir / "recover" / "adapter" / "training_run.json")
    if not record:
        return []
    first, last = record["held_out"][0], record["held_out"][-1]
    settings = record["settings"]
    stop = (f"stopped early at step {record['steps']} (no held-out improvement in {settings['patience']} points)"
            if record.get("stopped_early") else f"{record['steps']} steps")
    loss = (f"LoRA self-distillation plus {settings['label_weight']:g} × the text's next-token cross-entropy"
            if settings.get("label_weight") else "LoRA self-distillation")  # records before label_weight lack it
    lines = [f"{loss}, {stop}: {record['tokens_seen']:,} tokens "
             f"({settings['batch_size']} × {record['seq_len']} per step, lr {settings['lr']:g}, cosine), "
             f"{record['seconds_training']:.0f} s of training. Held-out KL {first['kl']:.4f} → {last['kl']:.4f}, "
             f"PPL {first['ppl']:.3f} → {last['ppl']:.3f} (original {last['original_ppl']:.3f}; "
             f"{record['held_out_chunks']} chunks).", ""]
    if (build_dir / "recover" / "curve.png").is_file():
        lines += ["![recovery curve](recover/curve.png)", ""]
    return lines


def _comparison_lines(compare: dict) -> list[str]:
    """The equal-budget comparison: every plan's KL, top-1 and PPL on each held-out text, before and after
    the same recovery."""
    recovery = compare.get("recovery")
    mix = compare.get("mix", {})
    mixed = f", {mix['mix_fraction']:g} of the chunks from {mix['mix']}" if mix.get("mix") else ""
    lines = [("Every plan below got the same recovery: " + (
        f"{recovery['steps']} LoRA steps of {recovery['batch_size']} chunks ({recovery['tokens']:,} tokens{mixed}), "
        f"rank {recovery['rank']}, lr {recovery['lr']:g}, seed {recovery['seed']}, from the same weights."
        if recovery else "none (recover.steps = 0): before recovery only.")), ""]
    after = compare.get("after")
    for text, info in compare["texts"].items():
        before = compare["before"][text]
        label = "the training text's held-out part" if text == "held_out" else f"`{text}`"
        lines += [f"{label} ({info['tokens']:,} tokens), original PPL {before['original']['ppl']:.3f}:", "",
                  "| plan | depth | KL before | top-1 | PPL before |" + (" KL after | top-1 | PPL after |" if after else ""),
                  "|---|---:|---:|---:|---:|" + ("---:|---:|---:|" if after else "")]
        for name, plan in compare["plans"].items():
            row = before[name]
            line = f"| {name} | {plan['depth']} | {row['kl']:.4f} | {row['top1']:.3f} | {row['ppl']:.3f} |"
            if after:
                rec = after[text][name]
                line += f" {rec['kl']:.4f} | {rec['top1']:.3f} | {rec['ppl']:.3f} |"
            lines.append(line)
        lines.append("")
    return lines


def _validation_rows(validation: dict) -> list[str]:
    data = validation["data"]
    rows = [f"Overall: **{'PASS' if validation['passed'] else 'FAIL'}** ({validation['precision']}; "
            f"{data['chunks']} held-out chunks, {data['prefill_tokens']}-token prefill then "
            f"{data['decode_steps']} decode steps on each side's own cache; {validation['structure']['detail']})", "",
            "| engine | phase | logits max abs | worst present max abs | top-1 | KL | passed |",
            "|---|---|---:|---:|---:|---:|---|"]
    for engine, result in validation["engines"].items():
        if "skipped" in result:
            rows.append(f"| {engine} | – | – | – | – | – | skipped: {result['skipped']} |")
            continue
        for phase in ("prefill", "decode"):
            p = result[phase]
            rows.append(f"| {engine} | {phase} | {p['logits']['max_abs']:.2e} | {p['worst_present']['max_abs']:.2e} | "
                        f"{p['top1']:.3f} | {p['kl']:.2e} | {'yes' if p['passed'] else 'NO: ' + '; '.join(p['failures'])} |")
    for engine, result in validation["engines"].items():
        if "perplexity" in result:
            ppl = result["perplexity"]
            rows.append(f"\n{engine}: held-out perplexity {ppl['engine']:.4g} vs the reference's {ppl['reference']:.4g} "
                        f"({ppl['ratio']:.4f}x){'' if ppl['passed'] else ' - over the limit'}.")
        if "greedy" in result:
            # lazy: greedy_agreement loads torch, and `cqil build --help` imports this module
            from cqil.engines.greedy_agreement import describe as describe_greedy

            rows.append(f"\n{engine}: {describe_greedy(result['greedy'])} (not a pass condition).")
    rows += [f"\nNote: {note}" for note in validation.get("notes", [])]
    return rows


def _serving_lines(serving: dict) -> list[str]:
    """Which export serves ONNX Runtime and GenAI, why, and what was refused on the way."""
    shipped = f"`--target {serving['target']} --layout {serving['layout']} --precision {serving['precision']}`"
    why = (f"the defaults: the fastest combination measured ({SERVE_BASIS})" if serving["defaults"]
           else "set in the build configuration ([serve])")
    order = ", ".join(t["precision"] for t in serving["tried"])
    lines = [f"`serve/onnx/` is {shipped}: what ONNX Runtime and ONNX Runtime GenAI (its genai_config.json) load. "
             f"Target and layout are {why}; the precision is the first of serve.precisions, fastest first, "
             f"whose export passed validate's checks against the merged PyTorch model (tried: {order}). "
             "`export/onnx/` stays the portable export that TensorRT and the Triton repository read.", ""]
    lines += [f"- {t['precision']}: refused ({'; '.join(t['failures'])})" for t in serving["tried"] if not t["passed"]]
    validation = serving["validation"]
    for engine, result in validation["engines"].items():
        if "skipped" not in result:
            ppl = result["perplexity"]
            lines.append(f"- {serving['precision']}, {engine}: top-1 {result['prefill']['top1']:.3f} prefill / "
                         f"{result['decode']['top1']:.3f} decode, KL {result['prefill']['kl']:.2e} / "
                         f"{result['decode']['kl']:.2e}, perplexity {ppl['ratio']:.4f}x the reference's: passed")
    return lines


def _latency_rows(latency: dict) -> list[str]:
    """ONNX Runtime reference vs CQIL per scenario, and the eager PyTorch pair timed in the same rounds."""
    ideal = latency.get("ideal_depth_ratio")
    rows = [f"Interleaved in one process after warm-up; ideal depth ratio (groups / layers) {ideal:.3f}.", "",
            "| scenario | engine | reference p50 ms | CQIL p50 ms | ratio CQIL / reference (95% CI) |",
            "|---|---|---:|---:|---|"]
    for name in sorted(latency["scenarios"], key=lambda n: n != "prefill"):  # prefill first
        s = latency["scenarios"][name]
        lo, hi = s["ratio_ci"]
        rows.append(f"| {name} | {latency.get('engine', 'onnx')} | {s['reference']['p50_ms']:.2f} | "
                    f"{s['candidate']['p50_ms']:.2f} | {s['ratio']:.3f} ({lo:.3f}–{hi:.3f}) |")
        torch_rows = s.get("rows") or {}
        if "pytorch_candidate" in torch_rows:
            ref, cand = torch_rows["pytorch_reference"], torch_rows["pytorch_candidate"]
            lo, hi = cand["ratio_ci"]
            rows.append(f"| {name} | pytorch eager | {ref['p50_ms']:.2f} | {cand['p50_ms']:.2f} | "
                        f"{cand['ratio']:.3f} ({lo:.3f}–{hi:.3f}) |")
    return rows


def render(build_dir: Path, results: list[StageResult], seconds: float) -> str:
    build_dir = Path(build_dir)
    plan = _load(build_dir / "plan" / "plan.json")
    search = _load(build_dir / "plan" / "plan.search.json")
    records = {r.name: r.record for r in results}
    lines = ["# CQIL build report", ""]
    if plan:
        parallel = [g for g in plan["groups"] if len(g) > 1]
        spans = ", ".join(f"{g[0]}-{g[-1]}" for g in parallel) or "none"
        how = "automatic" if search else "given"
        lines += [f"**Plan** ({how}): depth {plan['depth']} of {plan['num_layers']} layers, bypass d = {plan['bypass']}, "
                  f"parallel groups {spans} (model: {plan['model'].get('name') or plan['model'].get('model_type')}).", ""]
        if search:
            lines += [_search_line(search, records.get("plan", {}).get("metrics", {})), ""]
    if (build_dir / "analyze" / "similarity.png").is_file():
        lines += ["## Layer-input similarity", "", "![similarity](analyze/similarity.png)", ""]
    quality = _load(build_dir / "validate" / "quality.json")
    label = "auto" if search else "plan"
    if quality:
        lines += ["## Quality", "", f"Held-out text ({quality['tokens']:,} tokens, the training text's held-out part):", "",
                  *_quality_rows(quality, label), ""]
        second = quality.get("second_text")
        if second:
            lines += [f"Second held-out text, of another kind: `{second['name']}` ({second['tokens']:,} tokens, "
                      "never trained on):", "", *_quality_rows(second | {"plans": quality["plans"]}, label), ""]
    recovery = _recovery_lines(build_dir)
    if recovery:
        lines += ["## Recovery", "", *recovery]
    compare = _load(build_dir / "compare" / "compare.json")
    if compare and "skipped" not in compare:
        lines += ["## Equal-budget comparison: depth pruning and CQIL at the plan's depth", "", *_comparison_lines(compare)]
    validation = _load(build_dir / "validate" / "validation.json")
    if validation:
        lines += ["## Validation against the PyTorch reference", "", *_validation_rows(validation), ""]
    serving = _load(build_dir / "serve" / "serving.json")
    if serving:
        lines += ["## Serving artifact (ONNX Runtime, GenAI)", "", *_serving_lines(serving), ""]
    latency = _load(build_dir / "bench" / "latency.json")
    if latency:
        lines += ["## Latency", "", *_latency_rows(latency), ""]
        if (build_dir / "bench" / "latency.png").is_file():
            lines += ["![latency](bench/latency.png)", ""]
    lines += ["## Stages", "", "| stage | status | seconds | key | headline |", "|---|---|---:|---|---|"]
    for r in results:
        metrics = ", ".join(f"{k}: {v}" for k, v in r.record["metrics"].items() if not isinstance(v, (dict, list)))
        status = "ran" if r.status == "ran" else "up to date"
        lines.append(f"| {r.name} | {status} | {r.record['seconds']} | `{r.record['key']}` | {metrics} |")
    lines += ["", f"Wall time of this run: {seconds:.0f} s.", "", "## Skipped", ""]
    lines += skipped_notes(build_dir) or ["Nothing."]
    return "\n".join(lines) + "\n"


def _search_line(search: dict, metrics: dict) -> str:
    request, calibration = search["request"], search["calibration"]
    goal = (f"depth {request['target_depth']}" if request["target_depth"] is not None
            else f"held-out KL ≤ {request['max_kl']}")
    timing = (f" in {metrics['search_score_s']:.0f} s (verification {metrics['search_verify_s']:.0f} s)"
              if "search_score_s" in metrics else "")
    measured = search["measured"]
    return (f"Searched for {goal}: {len(search['candidates'])} candidate groups scored{timing} on "
            f"{calibration['tokens']:,} calibration tokens (KL at {calibration['scored_positions']:,} positions); "
            f"predicted KL {search['predicted_kl']:.4f}, measured {measured['kl']:.4f} on "
            f"{search['held_out']['tokens']:,} held-out tokens. `plan/plan.search.json` has the candidate table.")


def skipped_notes(build_dir: Path) -> list[str]:
    """What this build could not do, in plain words."""
    notes = []
    versions = library_versions()
    if versions["tensorrt"] == "not installed":
        notes.append("- TensorRT is not installed here: no engine was built or run. "
                     "`engines/trt/build_engine.sh` builds it on a GPU host with the same settings.")
    if not (Path(build_dir) / "recover" / "adapter").is_dir():
        notes.append("- Recovery was skipped (recover.steps = 0): the model is CQIL without fine-tuning.")
    return notes
