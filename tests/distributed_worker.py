"""One rank of the distributed tests, started by tests/engines/test_distributed.py as P separate processes.

Modes (argv[1]):
  parity SPEC.json  for each case (model, groups, d): this rank's CQIL share on a prefill, three decode
                    steps with its own cache and a greedy generation; then each model tensor parallel.
                    Rank 0 saves the logits/tokens; every rank saves its parameter count and layers.
  loop MODEL        loads a share, prints "ready", then decodes until a peer dies.
  fail-load         rank 1 raises while loading; the others must stop with a line naming it.
Failure handling is the product's own (engines.distributed.launch.run_ranks).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from cqil.engines.distributed.launch import run_ranks, together
from cqil.engines.distributed.per_rank import (
    AgreedTokens,
    Placement,
    load_rank_model,
    parameter_count,
    rank_model,
)
from cqil.engines.distributed.tensor_parallel import apply_tensor_parallel
from cqil.model.decoder import positions_from_mask
from cqil.model.plan import from_parallel_groups
from cqil.model.steps import greedy_generate


def _plan(path: Path, groups: list[list[int]], bypass: int, dropped: tuple[int, ...] = ()):
    from transformers import AutoConfig

    return from_parallel_groups(groups, AutoConfig.from_pretrained(path).num_hidden_layers, bypass, dropped=dropped)


def parity(ctx, spec: dict) -> None:
    from transformers import AutoModelForCausalLM, DynamicCache

    out, inputs = Path(spec["out"]), torch.load(spec["inputs"])
    ids, mask, steps = inputs["ids"], inputs["mask"], inputs["steps"]
    saved = {}
    for name, case in spec["cases"].items():
        path = Path(case["model"])
        placement = Placement(_plan(path, case["groups"], case["bypass"], tuple(case.get("dropped", ()))),
                              ctx.rank, ctx.world)
        model = rank_model(load_rank_model(path, placement), placement)
        (out / f"{name}.rank{ctx.rank}.json").write_text(json.dumps(
            {"parameters": parameter_count(model), "layers": placement.layers}))
        with torch.no_grad():
            logits, past = model(ids, mask)
            decoded, step_mask = [], mask
            for token in steps.T:
                step_mask = torch.cat((step_mask, step_mask.new_ones(step_mask.shape[0], 1)), 1)
                step_logits, past = model(token[:, None], step_mask, past_key_values=past)
                decoded.append(step_logits)
        tokens = greedy_generate(AgreedTokens(model), ids, mask, 6)
        saved[name] = {"prefill": logits, "decode": torch.cat(decoded, 1), "tokens": tokens}
    for path in sorted({case["model"] for case in spec["cases"].values()}):
        tp = apply_tensor_parallel(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
                                   ctx.rank, ctx.world)
        with torch.no_grad():
            cache = DynamicCache()
            prefill = tp(ids, attention_mask=mask, position_ids=positions_from_mask(mask, ids.shape[1]),
                         past_key_values=cache, use_cache=True).logits
            decoded, step_mask = [], mask
            for token in steps.T:
                step_mask = torch.cat((step_mask, step_mask.new_ones(step_mask.shape[0], 1)), 1)
                decoded.append(tp(token[:, None], attention_mask=step_mask,
                                  position_ids=positions_from_mask(step_mask, 1),
                                  past_key_values=cache, use_cache=True).logits)
        saved[f"tensor_parallel:{path}"] = {"prefill": prefill, "decode": torch.cat(decoded, 1)}
    if ctx.rank == 0:
        torch.save(saved, out / "logits.pt")


def loop(ctx, path: Path) -> None:
    placement = Placement(_plan(path, [[1, 2], [3, 4]], 1), ctx.rank, ctx.world)
    model = together(ctx, lambda: rank_model(load_rank_model(path, placement), placement))
    ids = torch.ones(1, 4, dtype=torch.long)
    print("ready", flush=True)
    with torch.no_grad():
        while True:
            model(ids)


def fail_load(ctx) -> None:
    def load():
        if ctx.rank == 1:
            raise OSError("disk on fire")
        return 0

    together(ctx, load)


if __name__ == "__main__":
    mode = sys.argv[1]
    bodies = {"parity": lambda ctx: parity(ctx, json.loads(Path(sys.argv[2]).read_text())),
              "loop": lambda ctx: loop(ctx, Path(sys.argv[2])),
              "fail-load": fail_load}
    sys.exit(run_ranks(f"worker {mode}", "gloo", bodies[mode], timeout_s=float(sys.argv[-1])))
