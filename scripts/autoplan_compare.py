"""Auto plans vs the best uniform S:E:P plans of the same depth, held-out PPL and KL in one run.

    PYTHONPATH=. python scripts/autoplan_compare.py [--depths 24,22,20] [--max-chunks 8] [--out DIR]

The candidates are scored once on calibration chunks; for each depth the DP picks the auto plan.
The uniform baseline: every S:E:P plan of that depth with 2 <= P <= --max-group-size and d in
--bypass-choices is ranked by the same additive prediction; the --uniform-top best of them and the
paper-style plans that end at the last layer are measured on the same calibration chunks (KL of the
whole plan) and the best measured one is kept, as is the best one ending at the last layer. All
kept plans are then evaluated on the held-out text in one pass (pipeline.quality.evaluate), against
the same original.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cqil.model.cqil import CqilModel  # noqa: E402
from cqil.model.plan import Plan, identity_plan, uniform_plan  # noqa: E402
from cqil.pipeline.autoplan import (  # noqa: E402
    SearchRequest,
    calibration_kl,
    group_costs,
    parse_bypass_choices,
    predicted_kl,
    score_candidates,
    select,
)
from cqil.pipeline.data import load_split  # noqa: E402
from cqil.pipeline.quality import evaluate  # noqa: E402
from cqil.pipeline.sources import load_model  # noqa: E402


def uniform_plans(layers: int, depth: int, max_size: int, choices: tuple[int, ...]) -> list[tuple[str, Plan]]:
    """Every distinct uniform plan (S:E:P, d) of exactly `depth` groups, named by its spec."""
    seen, plans = set(), []
    for size in range(2, max_size + 1):
        for start in range(layers):
            for end in range(start + size, layers + 1):
                for d in choices:
                    if d > size - 1:
                        continue
                    plan = uniform_plan(start, end, size, layers, d)
                    if plan.depth == depth and (plan.groups, plan.bypass) not in seen:
                        seen.add((plan.groups, plan.bypass))
                        plans.append((f"{start}:{end}:{size} d={d}", plan))
    return plans


def spans(plan: Plan) -> str:
    return ",".join(f"{g[0]}-{g[-1]}" for g in plan.groups if len(g) > 1) or "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--depths", default="24,22,20")
    parser.add_argument("--max-chunks", type=int, default=8, help="calibration chunks (default %(default)s)")
    parser.add_argument("--eval-chunks", type=int, default=None, help="held-out chunks (default: all)")
    parser.add_argument("--max-group-size", type=int, default=2)
    parser.add_argument("--bypass-choices", default="0,1")
    parser.add_argument("--uniform-top", type=int, default=6,
                        help="uniform plans per depth measured on calibration text (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("/tmp/autoplan"))
    args = parser.parse_args()

    loaded = load_model(args.model)
    layers = loaded.model.config.num_hidden_layers
    split = load_split(loaded.tokenizer)
    calibration = split.train[: args.max_chunks]
    held_out = split.held_out if args.eval_chunks is None else split.held_out[: args.eval_chunks]
    choices = parse_bypass_choices(args.bypass_choices)
    depths = [int(d) for d in args.depths.split(",")]
    original = CqilModel(loaded.model, identity_plan(layers))
    timings = {}

    start = time.perf_counter()
    candidates = score_candidates(original, calibration, args.max_group_size, choices, batch_size=args.batch_size)
    autos = {}
    for depth in depths:
        request = SearchRequest(target_depth=depth, max_group_size=args.max_group_size, bypass_choices=choices)
        request.check(layers)
        autos[depth] = select(candidates, request, layers)
    timings["auto_search_s"] = round(time.perf_counter() - start, 1)

    start = time.perf_counter()
    pool, searched = [], {}
    for depth in depths:
        uniform = uniform_plans(layers, depth, args.max_group_size, choices)
        searched[depth] = len(uniform)
        ranked = sorted(uniform, key=lambda u: predicted_kl(u[1].groups, group_costs(candidates, u[1].bypass)))
        tail = [u for u in uniform if u[1].groups[-1][-1] == layers - 1 and len(u[1].groups[-1]) > 1]
        kept = ranked[: args.uniform_top]
        pool += [(depth, name, plan) for name, plan in kept + [t for t in tail if t not in kept]]
        pool.append((depth, "auto", autos[depth].plan({})))
    measured = calibration_kl(original, [plan for _, _, plan in pool], calibration, args.batch_size)
    timings["uniform_search_s"] = round(time.perf_counter() - start, 1)

    rows = {}
    for depth in depths:
        entries = [(kl, name, plan) for (dep, name, plan), kl in zip(pool, measured) if dep == depth]
        uniform = [e for e in entries if e[1] != "auto"]
        tail = [e for e in uniform if e[2].groups[-1][-1] == layers - 1 and len(e[2].groups[-1]) > 1]
        rows[depth] = {"auto": next(e for e in entries if e[1] == "auto"),
                       "best uniform": min(uniform, key=lambda e: e[0]),
                       "uniform ending at L": min(tail, key=lambda e: e[0]),
                       "uniform plans measured": len(uniform)}

    start = time.perf_counter()
    models = {f"{depth} {kind}": original.with_plan(rows[depth][kind][2])
              for depth in depths for kind in ("auto", "best uniform", "uniform ending at L")}
    quality = evaluate(original, models, held_out, args.batch_size)
    timings["held_out_eval_s"] = round(time.perf_counter() - start, 1)

    report = {"model": loaded.name, "data": split.source, "layers": layers,
              "calibration": {"chunks": len(calibration), "tokens": calibration.numel()},
              "held_out": {"chunks": len(held_out), "tokens": held_out.numel()},
              "max_group_size": args.max_group_size, "bypass_choices": list(choices),
              "uniform_plans": {str(d): {"ranked": searched[d], "measured": rows[d]["uniform plans measured"]}
                                for d in depths},
              "candidates": [c.to_dict() for c in candidates], "timings": timings,
              "original": quality["original"], "rows": []}
    print(f"{loaded.name}, {layers} layers; calibration {calibration.numel()} tokens, "
          f"held-out {held_out.numel()} tokens; original held-out PPL {quality['original']['ppl']:.3f}")
    print("| depth | plan | spec | parallel groups | d | predicted KL | calib. KL | held-out KL | held-out PPL | top-1 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for depth in depths:
        for kind in ("auto", "best uniform", "uniform ending at L"):
            calib_kl, name, plan = rows[depth][kind]
            predicted = predicted_kl(plan.groups, group_costs(candidates, plan.bypass))
            result = quality[f"{depth} {kind}"]
            report["rows"].append({"depth": depth, "plan": kind, "spec": name,
                                   "groups": [list(g) for g in plan.groups], "bypass": plan.bypass, "predicted_kl": predicted, "calibration_kl": calib_kl,
                                   **{k: result[k] for k in ("ppl", "kl", "top1")}})
            print(f"| {depth} | {kind} | {name if kind != 'auto' else '-'} | {spans(plan)} | {plan.bypass} | "
                  f"{predicted:.4f} | {calib_kl:.4f} | {result['kl']:.4f} | {result['ppl']:.3f} | "
                  f"{result['top1']:.3f} |")
    print("uniform plans per depth, ranked / measured on calibration: "
          + ", ".join(f"{searched[d]} / {rows[d]['uniform plans measured']}" for d in depths))
    print(f"timings (2 threads): {timings}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out / 'compare.json'}")


if __name__ == "__main__":
    main()
