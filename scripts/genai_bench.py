"""Latency under ONNX Runtime GenAI's Generator: its own model-builder export vs our exports, per precision.

    flock -x /tmp/cqil-cpu.lock nice -n -15 python scripts/genai_bench.py [--work DIR] [--plan plan.json ...]
        [--precisions fp32,int4] [--target onnxruntime] [--layouts branches,fused] [--threads 2] [--rounds 7]
        [--steps 24] [--prompts 64,512] [--prefill 128]

On the default model (SmolLM2-135M-Instruct, from the cqil cache; no hub), the folders are made once
in --work (default <cqil cache>/genai_bench) and reused, for each precision P:

    builder-P/        python -m onnxruntime_genai.models.builder -i <HF folder> -p P -e cpu
    original-T-P/     cqil export --original --target T --precision P           (every layer alone)
    cqil-LAYOUT-T-P/  cqil export --plan <plan> --target T --layout LAYOUT --precision P
                      (--plan: default the paper-style --uniform 15:30:2 --bypass 1; the word `uniform` names it)
    cqil-NAME-LAYOUT-T-P/   the same for each of several --plan options, NAME the plan file's stem (or uniform)

All are loaded at once as `onnxruntime_genai.Model`s with the same intra-op threads and timed
interleaved: each round runs every model once (the order rotating from round to round): a prefill of
--prefill tokens, then for each prompt length a prefill and --steps decode steps timed one by one.
Reported per measurement: the median over all rounds, and the ratio of each model's median to the
builder's at the same precision with a 95 % bootstrap interval over rounds (the rounds are paired:
every model ran in every round). The load average before and after goes in the result too, with the
greedy tokens of each model (int8 activations at accuracy level 4 may flip near-ties).
Results go to <work>/genai_bench.json; the markdown table to stdout; --chart PNG draws the ratios
(--chart-from JSON redraws a saved result).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

UNIFORM_PLAN = ("--uniform", "15:30:2", "--bypass", "1")
BUILDER_PRECISIONS = {"fp32": "fp32", "fp16": "fp16", "int8": "int8", "int4": "int4"}


def plan_options(plans: list[str]) -> dict[str, tuple[str, ...]]:
    """Plan name -> `cqil export` options: a plan.json by its stem, `uniform` (or none given) the paper-style plan."""
    if not plans:
        return {"": UNIFORM_PLAN}
    named = {("uniform" if plan == "uniform" else Path(plan).stem):
             (UNIFORM_PLAN if plan == "uniform" else ("--plan", str(Path(plan).resolve()))) for plan in plans}
    return {"": next(iter(named.values()))} if len(named) == 1 else named


def kinds(precisions: list[str], layouts: list[str], plans: dict[str, tuple[str, ...]]) -> list[tuple[str, str]]:
    """(kind, precision) in table order: per precision, the builder, our original, then each CQIL plan and layout."""
    cqil = [f"cqil-{name}-{layout}" if name else f"cqil-{layout}" for name in plans for layout in layouts]
    return [(kind, precision) for precision in precisions for kind in ("builder", "original", *cqil)]


def make_folder(work: Path, model_dir: Path, kind: str, precision: str, plans: dict[str, tuple[str, ...]],
                target: str) -> Path:
    """One export, made when missing (each ~1-4 min on two shared cores)."""
    from cqil.pipeline.cli import main as cqil

    folder = work / (f"{kind}-{precision}" if kind == "builder" else f"{kind}-{target}-{precision}")
    if (folder / "genai_config.json").is_file():
        return folder
    if kind == "builder":
        if precision not in BUILDER_PRECISIONS:
            raise SystemExit(f"genai_bench: the model builder has no CPU precision {precision}")
        print(f"building {precision} with onnxruntime_genai.models.builder ...", file=sys.stderr)
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir),
                   "-o", str(folder), "-p", BUILDER_PRECISIONS[precision], "-e", "cpu",
                   "-c", str(work / "builder_cache")]
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if result.returncode != 0:
            raise SystemExit(f"genai_bench: the model builder failed:\n{result.stderr[-2000:]}")
        return folder
    if kind == "original":
        extra: tuple[str, ...] = ("--original",)
    else:
        name, _, layout = kind.removeprefix("cqil-").rpartition("-")
        extra = (*plans[name], "--layout", layout)
    extra += ("--target", target)
    print(f"cqil export {' '.join(extra)} --precision {precision} ...", file=sys.stderr)
    if cqil(["export", "--model", str(model_dir), *extra, "--precision", precision, "--out", str(folder)]) != 0:
        raise SystemExit(f"genai_bench: cqil export {' '.join(extra)} failed")
    return folder


def prompt_tokens(model_dir: Path, count: int) -> list[int]:
    """The first `count` tokens of the default held-out text: the same prompt for every model."""
    from cqil.pipeline.data import default_text
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer.encode(default_text()[-40_000:], add_special_tokens=False)
    return ids[:count]


def ratio_interval(mine: list[list[float]], base: list[list[float]], seed: int = 0) -> tuple[float, float, float]:
    """Median(mine) / median(base) over all samples, and a 95 % bootstrap interval resampling paired rounds."""
    rng = random.Random(seed)

    def ratio(rounds: list[int]) -> float:
        return (statistics.median(x for r in rounds for x in mine[r])
                / statistics.median(x for r in rounds for x in base[r]))

    indices = list(range(len(mine)))
    draws = sorted(ratio([rng.choice(indices) for _ in indices]) for _ in range(1000))
    return ratio(indices), draws[25], draws[974]


def chart(result: dict, path: Path) -> None:
    """Each of our exports' ratio to the builder at the same weights, with its interval, per measurement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in result["rows"] if row["export"] != "builder"]
    ratios = [row["vs_builder"] for row in rows]
    errors = [[r - row["vs_builder_95"][0] for r, row in zip(ratios, rows)],
              [row["vs_builder_95"][1] - r for r, row in zip(ratios, rows)]]
    fig, ax = plt.subplots(figsize=(9, 6))
    ax.barh(range(len(rows)), ratios, xerr=errors,
            color=["#4c72b0" if row["export"] == "original" else "#dd8452" for row in rows])
    ax.set_yticks(range(len(rows)), [f"{row['measure']}\n{row['export']} {row['precision']}" for row in rows], fontsize=7)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.axvline(0.85, color="r", lw=0.8, ls="--", label="goal: CQIL int4 0.85x")
    ax.axvline(0.90, color="g", lw=0.8, ls=":", label="goal: CQIL fp32 0.90x")
    ax.set_xlabel("time / GenAI model builder's export at the same weights (95% bootstrap CI)")
    ax.set_title(f"{result['model']}, --target {result['target']}, GenAI Generator, {result['threads']} threads, "
                 f"{result['date']}, load {result['load_average_before'][0]:.1f}-{result['load_average_after'][0]:.1f}",
                 fontsize=9)
    ax.legend(fontsize=7)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    from cqil.engines.genai import GenaiModel
    from cqil.model.fsutil import cache_dir
    from cqil.pipeline.sources import default_model_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="folder for the exports and the result")
    parser.add_argument("--plan", action="append", default=[],
                        help="plan.json of the CQIL exports, or `uniform` (repeat for several plans)")
    parser.add_argument("--precisions", default="fp32,int4")
    parser.add_argument("--target", default="onnxruntime", help="target of our exports (portable or onnxruntime)")
    parser.add_argument("--layouts", default="branches,fused", help="CQIL layouts")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=24, help="decode steps timed per run")
    parser.add_argument("--prompts", default="64,512", help="prompt lengths the decode steps follow")
    parser.add_argument("--prefill", type=int, default=128, help="prompt length of the timed prefill (0: none)")
    parser.add_argument("--chart", type=Path, default=None, help="also draw the ratios into this PNG")
    parser.add_argument("--chart-from", type=Path, default=None, help="only draw --chart from this result JSON")
    args = parser.parse_args(argv)
    if args.chart_from:
        chart(json.loads(args.chart_from.read_text()), args.chart or args.chart_from.with_suffix(".png"))
        return 0
    load_before = os.getloadavg()
    work = args.work or cache_dir() / "genai_bench"
    work.mkdir(parents=True, exist_ok=True)
    model_dir = default_model_dir()
    plans = plan_options(args.plan)
    table = kinds(args.precisions.split(","), args.layouts.split(","), plans)
    folders = {(kind, p): make_folder(work, model_dir, kind, p, plans, args.target) for kind, p in table}
    lengths = [int(n) for n in args.prompts.split(",")]
    text = prompt_tokens(model_dir, max([*lengths, args.prefill]))
    models = {key: GenaiModel(folder, threads=args.threads) for key, folder in folders.items()}
    greedy = {key: model.greedy([text[:64]], 16)[0] for key, model in models.items()}  # also the warm-up

    measures = ([f"prefill {args.prefill}"] if args.prefill else []) + [f"decode after {n}" for n in lengths]
    # samples[measure][key][round] = seconds (per decode step, or per prefill)
    samples = {m: {key: [] for key in models} for m in measures}
    load_start = os.getloadavg()
    started = time.time()
    for round_index in range(args.rounds):
        shift = round_index % len(table)
        for key in table[shift:] + table[:shift]:
            model = models[key]
            if args.prefill:
                samples[f"prefill {args.prefill}"][key].append([model.prefill_seconds(text[:args.prefill])])
            for n in lengths:
                samples[f"decode after {n}"][key].append(model.decode_step_seconds(text[:n], args.steps))
    rows = []
    for measure in measures:
        for kind, precision in table:
            mine, base = samples[measure][(kind, precision)], samples[measure][("builder", precision)]
            ratio, low, high = ratio_interval(mine, base)
            rows.append({"measure": measure, "export": kind, "precision": precision,
                         "median_ms": 1e3 * statistics.median(x for r in mine for x in r),
                         "vs_builder": ratio, "vs_builder_95": [low, high]})
    result = {"model": model_dir.name, "target": args.target, "threads": args.threads, "rounds": args.rounds, "steps": args.steps,
              "plans": plans, "date": time.strftime("%Y-%m-%d", time.gmtime()), "seconds": round(time.time() - started, 1),
              "cpu_count": os.cpu_count(), "load_average_before": load_before, "load_average_timed_start": load_start,
              "load_average_after": os.getloadavg(), "rows": rows,
              "greedy_tokens": {f"{k}-{p}": tokens for (k, p), tokens in greedy.items()},
              "folders": {f"{k}-{p}": str(f) for (k, p), f in folders.items()}}
    (work / "genai_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.chart:
        chart(result, args.chart)

    print(f"{model_dir.name}, ONNX Runtime GenAI Generator, CPU, {args.threads} threads; {args.rounds} interleaved "
          f"rounds x {args.steps} decode steps; load {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
    print("| measure | export | weights | median ms | vs builder, same weights (95 % CI) |")
    print("|---|---|---|---:|---:|")
    for row in rows:
        low, high = row["vs_builder_95"]
        print(f"| {row['measure']} | {row['export']} | {row['precision']} | {row['median_ms']:.2f} | "
              f"{row['vs_builder']:.3f} ({low:.3f}-{high:.3f}) |")
    for precision in args.precisions.split(","):
        ours, theirs = greedy[("original", precision)], greedy[("builder", precision)]
        agree = sum(a == b for a, b in zip(ours, theirs))
        print(f"greedy tokens, {precision}: builder vs our original {agree}/{len(ours)} the same")
        for kind in dict.fromkeys(kind for kind, _ in table):
            if kind.endswith("-fused") and (branches := greedy.get((kind.removesuffix("fused") + "branches", precision))):
                agree = sum(a == b for a, b in zip(greedy[(kind, precision)], branches))
                print(f"greedy tokens, {precision}: {kind} vs its branch layout {agree}/{len(branches)} the same")
    return 0


if __name__ == "__main__":
    sys.exit(main())
