"""Original vs CQIL branch layout vs CQIL fused layout on ONNX Runtime, timed interleaved in one run.

    PYTHONPATH=. python scripts/bench_layouts.py --original DIR --branches DIR --fused DIR \
        [--threads 2] [--seq 128] [--past 128] [--prefill-repeats 30] [--decode-repeats 200] [--out FILE]

`cqil bench` compares one candidate with the reference; this script puts both layouts and the eager
PyTorch models (original and CQIL, the source model recorded in the branch export) in the same
rounds, so every median and ratio in its table comes from one interleaved run. Prints a Markdown
table; --out writes the raw numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cqil.engines.latency import compare, interleaved_times, stats_ms
from cqil.engines.onnxruntime import OrtRunner
from cqil.model.cqil import CqilModel
from cqil.model.plan import identity_plan
from cqil.model.steps import timing_calls
from cqil.pipeline.sources import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("original", "branches", "fused"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--past", type=int, default=128)
    parser.add_argument("--prefill-repeats", type=int, default=30)
    parser.add_argument("--decode-repeats", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    runners = {name: OrtRunner(getattr(args, name), threads=args.threads, spin=False)
               for name in ("original", "branches", "fused")}
    plan = runners["branches"].plan
    loaded = load_model(runners["branches"].spec.source_model()["path"])
    eager = {"pytorch original": CqilModel(loaded.model, identity_plan(plan.num_layers)),
             "pytorch CQIL": CqilModel(loaded.model, plan)}
    vocab = loaded.model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.past + args.seq), generator=torch.Generator().manual_seed(0))
    calls = {f"ORT {name}": timing_calls(runner, ids, args.past) for name, runner in runners.items()}
    calls.update({name: timing_calls(model, ids, args.past) for name, model in eager.items()})
    repeats = {"prefill": args.prefill_repeats, "decode": args.decode_repeats}
    results = {"load_average_before": os.getloadavg(), "plan": plan.describe(),
               "ideal_depth_ratio": plan.depth / plan.num_layers, "scenarios": {},
               "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    for index, scenario in enumerate(("prefill", "decode")):
        times = interleaved_times({name: pair[index] for name, pair in calls.items()}, repeats[scenario],
                                  args.warmup, progress=scenario)
        rows = {}
        for name, seconds in times.items():
            baseline = times["pytorch original" if name.startswith("pytorch") else "ORT original"]
            row = compare(baseline, seconds)
            rows[name] = {**stats_ms(seconds).to_dict(), "ratio": row.ratio, "ratio_ci": list(row.ratio_ci)}
        results["scenarios"][scenario] = rows
    results["load_average_after"] = os.getloadavg()
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"plan {results['plan']}; ideal depth ratio {results['ideal_depth_ratio']:.3f}; threads {args.threads}; "
          f"load average before {results['load_average_before'][0]:.2f}, after {results['load_average_after'][0]:.2f}")
    print("| scenario | model | p50 ms | p90 ms | p99 ms | ratio to original (95% CI) |")
    print("|---|---|---|---|---|---|")
    for scenario, rows in results["scenarios"].items():
        shape = (f"batch {args.batch} x seq {args.seq}" if scenario == "prefill"
                 else f"batch {args.batch}, past {args.past}")
        for name, row in rows.items():
            low, high = row["ratio_ci"]
            print(f"| {scenario} ({shape}) | {name} | {row['p50_ms']:.2f} | {row['p90_ms']:.2f} | "
                  f"{row['p99_ms']:.2f} | {row['ratio']:.3f} ({low:.3f}-{high:.3f}) |")


if __name__ == "__main__":
    main()
