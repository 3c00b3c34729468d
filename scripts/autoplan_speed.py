"""The fast plan search against today's exhaustive scoring, side by side in one process (same load).

    PYTHONPATH=. python scripts/autoplan_speed.py [--depths 23,20,24] [--out DIR]

Scores the candidates three times: fast (the build's defaults), exhaustive (8 calibration chunks,
every position, d in {0, 1}: the search before issue 12), fast again (so a change of load during the
run shows). Then: Spearman rank correlation of the fast and exhaustive KLs of the same candidates, the
plans both pick at each depth, and those plans with the paper-style uniform plan of the same depth
evaluated on the held-out text in one pass. Also the cost of one layer and of the LM head on a batch,
from which the scoring cost for another layer count follows (docs/autoplan.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from cqil.model.cqil import CqilModel  # noqa: E402
from cqil.model.divergence import token_kl  # noqa: E402
from cqil.model.plan import identity_plan  # noqa: E402
from cqil.pipeline.autoplan import (  # noqa: E402
    SearchRequest,
    original_pass,
    parse_bypass_choices,
    score_candidates,
    scored_positions,
    select,
    uniform_of_depth,
)
from cqil.pipeline.build_config import DEFAULTS  # noqa: E402
from cqil.pipeline.data import load_split  # noqa: E402
from cqil.pipeline.quality import evaluate  # noqa: E402
from cqil.pipeline.sources import load_model  # noqa: E402


def ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):  # ties share their mean rank
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = torch.tensor(ranks(a)), torch.tensor(ranks(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def timed_scoring(original, chunks, choices, head_every, batch_size):
    start = time.perf_counter()
    candidates = score_candidates(original, chunks, 2, choices, batch_size=batch_size, head_every=head_every)
    return candidates, round(time.perf_counter() - start, 1)


@torch.no_grad()
def unit_costs(original: CqilModel, batch: torch.Tensor, head_every: int, repeats: int = 3) -> dict[str, float]:
    """Seconds for one decoder layer, and for the LM head + KL at every / every k-th position, on `batch`."""
    hidden, step, reference = original_pass(original, batch)
    x = hidden[original.num_layers // 2]

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    def head(every: int) -> None:
        positions = scored_positions(every)
        token_kl(reference[:, positions], F.log_softmax(original.head(x[:, positions]).float(), -1)).sum()

    return {"layer_s": best(lambda: original.run_group(3, x, step, [None])),
            "head_all_s": best(lambda: head(1)), "head_fast_s": best(lambda: head(head_every))}


def main() -> None:
    fast = DEFAULTS["plan"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--depths", default="23,20,24")
    parser.add_argument("--fast-chunks", type=int, default=fast["calibration_chunks"])
    parser.add_argument("--head-every", type=int, default=fast["head_every"])
    parser.add_argument("--fast-bypass", default=fast["bypass_choices"])
    parser.add_argument("--full-chunks", type=int, default=8)
    parser.add_argument("--eval-chunks", type=int, default=None, help="held-out chunks (default: all)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("/tmp/autoplan/speed"))
    args = parser.parse_args()

    loaded = load_model(args.model)
    layers = loaded.model.config.num_hidden_layers
    split = load_split(loaded.tokenizer)
    held_out = split.held_out if args.eval_chunks is None else split.held_out[: args.eval_chunks]
    original = CqilModel(loaded.model, identity_plan(layers))
    fast_choices = parse_bypass_choices(args.fast_bypass)
    print(f"threads {torch.get_num_threads()}; fast: {args.fast_chunks} chunks, head every {args.head_every}, "
          f"d in {fast_choices}; exhaustive: {args.full_chunks} chunks, every position, d in (0, 1)", flush=True)

    fast1, fast1_s = timed_scoring(original, split.train[: args.fast_chunks], fast_choices, args.head_every,
                                   args.batch_size)
    print(f"fast scoring: {fast1_s} s", flush=True)
    full, full_s = timed_scoring(original, split.train[: args.full_chunks], (0, 1), 1, args.batch_size)
    print(f"exhaustive scoring: {full_s} s", flush=True)
    _, fast2_s = timed_scoring(original, split.train[: args.fast_chunks], fast_choices, args.head_every,
                               args.batch_size)
    print(f"fast scoring again: {fast2_s} s", flush=True)
    costs = unit_costs(original, split.train[: args.batch_size], args.head_every)

    by_key = {(c.start, c.size, c.bypass): c.kl for c in full}
    common = [(c.kl, by_key[(c.start, c.size, c.bypass)]) for c in fast1]
    rho = spearman([a for a, _ in common], [b for _, b in common])
    pairs_d0 = [by_key[(s, 2, 0)] for s in range(layers - 1)]
    pairs_d1 = [by_key[(s, 2, 1)] for s in range(layers - 1)]

    depths = [int(d) for d in args.depths.split(",")]
    models, picks, labels, plan_label = {}, {}, {}, {}  # each distinct plan is evaluated once
    for depth in depths:
        for name, candidates, choices in (("exhaustive", full, (0, 1)), ("fast", fast1, fast_choices)):
            choice = select(candidates, SearchRequest(target_depth=depth, bypass_choices=choices), layers)
            picks[(depth, name)] = choice
            labels[(depth, name)] = plan_label.setdefault((choice.groups, choice.plan_bypass), f"{depth} {name}")
            models.setdefault(labels[(depth, name)], original.with_plan(choice.plan({})))
        uniform = uniform_of_depth(layers, depth, 2, 1)
        if uniform:
            models[f"{depth} uniform S{uniform[0]} d=1"] = original.with_plan(uniform[1])
    start = time.perf_counter()
    quality = evaluate(original, models, held_out, args.batch_size)
    eval_s = round(time.perf_counter() - start, 1)

    report = {"model": loaded.name, "threads": torch.get_num_threads(), "layers": layers,
              "fast": {"chunks": args.fast_chunks, "head_every": args.head_every, "bypass_choices": list(fast_choices),
                       "seconds": [fast1_s, fast2_s], "candidates": len(fast1)},
              "exhaustive": {"chunks": args.full_chunks, "seconds": full_s, "candidates": len(full)},
              "ratio": round(full_s / ((fast1_s + fast2_s) / 2), 2), "spearman": round(rho, 4),
              "pairs_where_d0_beats_d1": [s for s in range(layers - 1) if pairs_d0[s] < pairs_d1[s]],
              "unit_costs": costs, "held_out": {"chunks": len(held_out), "tokens": held_out.numel(), "seconds": eval_s},
              "original_ppl": quality["original"]["ppl"], "plans": {},
              "candidates": {"fast": [c.to_dict() for c in fast1], "exhaustive": [c.to_dict() for c in full]}}
    for depth in depths:
        for name in ("exhaustive", "fast"):
            choice = picks[(depth, name)]
            row = quality[labels[(depth, name)]]
            report["plans"][f"{depth} {name}"] = {
                "groups": [f"{g[0]}-{g[-1]}" for g in choice.groups if len(g) > 1], "bypass": choice.plan_bypass,
                "predicted_kl": choice.predicted_kl, **{k: row[k] for k in ("kl", "ppl", "top1")}}
        for key in quality:
            if key.startswith(f"{depth} uniform"):
                report["plans"][key] = {k: quality[key][k] for k in ("kl", "ppl", "top1")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({key: value for key, value in report.items() if key != "candidates"}, indent=2))


if __name__ == "__main__":
    main()
