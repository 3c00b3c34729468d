"""Decode latency under ONNX Runtime GenAI's Generator: its own model-builder export vs our exports.

    python scripts/genai_bench.py [--work DIR] [--threads 2] [--rounds 7] [--steps 32] [--prompt-tokens 64]

On the default model (SmolLM2-135M-Instruct, from the cqil cache; no hub), three folders are made
once in --work (default <cqil cache>/genai_bench) and reused:

    builder/    python -m onnxruntime_genai.models.builder -i <HF folder> -p fp32 -e cpu
    original/   cqil export --original                      (our graph, every layer alone)
    cqil/       cqil export --uniform 15:30:2 --bypass 1    (our graph, the paper-style CQIL plan)

All three are loaded at once as `onnxruntime_genai.Model`s with the same intra-op threads and timed
interleaved: each round runs every model once (the order rotating from round to round), a run being
a prefill of the same prompt then --steps decode steps timed one by one. Reported: the median and
p90 of the per-step times over all rounds, and the ratios of the medians. The greedy tokens of the
three are printed too (the builder's fused kernels may pick other tokens where logits nearly tie).
Results go to <work>/genai_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KINDS = ("builder", "original", "cqil")
CQIL_PLAN = ("--uniform", "15:30:2", "--bypass", "1")


def make_folders(work: Path, model_dir: Path) -> dict[str, Path]:
    """The three exports, made when missing (each ~1-4 min on two shared cores)."""
    from cqil.pipeline.cli import main as cqil

    folders = {kind: work / kind for kind in KINDS}
    if not (folders["builder"] / "genai_config.json").is_file():
        print("building with onnxruntime_genai.models.builder ...", file=sys.stderr)
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir),
                   "-o", str(folders["builder"]), "-p", "fp32", "-e", "cpu", "-c", str(work / "builder_cache")]
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if result.returncode != 0:
            raise SystemExit(f"genai_bench: the model builder failed:\n{result.stderr[-2000:]}")
    for kind, extra in (("original", ("--original",)), ("cqil", CQIL_PLAN)):
        if not (folders[kind] / "genai_config.json").is_file():
            print(f"cqil export {' '.join(extra)} ...", file=sys.stderr)
            if cqil(["export", "--model", str(model_dir), *extra, "--out", str(folders[kind])]) != 0:
                raise SystemExit(f"genai_bench: cqil export {' '.join(extra)} failed")
    return folders


def prompt_tokens(model_dir: Path, count: int) -> list[int]:
    """The first `count` tokens of the default held-out text: the same prompt for every model."""
    from cqil.pipeline.data import default_text
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer.encode(default_text()[-20_000:], add_special_tokens=False)
    return ids[:count]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    from cqil.engines.genai import GenaiModel
    from cqil.model.fsutil import cache_dir
    from cqil.pipeline.sources import default_model_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="folder for the exports and the result")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per run")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    work = args.work or cache_dir() / "genai_bench"
    work.mkdir(parents=True, exist_ok=True)
    model_dir = default_model_dir()
    folders = make_folders(work, model_dir)
    prompt = prompt_tokens(model_dir, args.prompt_tokens)
    models = {kind: GenaiModel(folder, threads=args.threads) for kind, folder in folders.items()}
    greedy = {kind: model.greedy([prompt], 16)[0] for kind, model in models.items()}  # also the warm-up

    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    started = time.time()
    for round_index in range(args.rounds):
        order = KINDS[round_index % len(KINDS):] + KINDS[:round_index % len(KINDS)]
        for kind in order:
            times[kind].extend(models[kind].decode_step_seconds(prompt, args.steps))
    rows = {kind: {"median_ms": 1e3 * statistics.median(t), "p90_ms": 1e3 * percentile(t, 0.9), "steps": len(t)}
            for kind, t in times.items()}
    for kind in KINDS:
        rows[kind]["vs_builder"] = rows[kind]["median_ms"] / rows["builder"]["median_ms"]
        rows[kind]["vs_original"] = rows[kind]["median_ms"] / rows["original"]["median_ms"]
    result = {"model": model_dir.name, "threads": args.threads, "rounds": args.rounds, "steps": args.steps,
              "prompt_tokens": len(prompt), "seconds": round(time.time() - started, 1),
              "cpu_count": os.cpu_count(), "load_average_1m": os.getloadavg()[0], "decode": rows,
              "greedy_tokens": greedy, "folders": {kind: str(folder) for kind, folder in folders.items()}}
    (work / "genai_bench.json").write_text(json.dumps(result, indent=2) + "\n")

    print(f"{model_dir.name}, ONNX Runtime GenAI Generator, CPU, {args.threads} threads; prompt {len(prompt)} "
          f"tokens, {args.rounds} interleaved rounds x {args.steps} decode steps")
    print("| export | decode median ms/token | p90 | vs builder | vs our original |")
    print("|---|---|---|---|---|")
    for kind in KINDS:
        row = rows[kind]
        print(f"| {kind} | {row['median_ms']:.2f} | {row['p90_ms']:.2f} | {row['vs_builder']:.3f} | "
              f"{row['vs_original']:.3f} |")
    agree = sum(a == b for a, b in zip(greedy["builder"], greedy["original"]))
    print(f"greedy tokens, builder vs our original: {agree}/{len(greedy['original'])} the same; "
          f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
