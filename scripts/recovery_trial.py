"""One recovery setting of a finished build, measured as the build measures it, without the export.

    python scripts/recovery_trial.py --build BUILD --out DIR [--set recover.lr=0.003 --set recover.steps=30 ...]

Runs what the build's recover stage runs (pipeline/build.py: the same training chunks, the `[data]` mix,
the `[recover]` settings of BUILD/build.toml updated by --set, the plan BUILD/plan/plan.json), then what
its validate stage reports as "PPL / original" (`pipeline.quality.evaluate` on the first
`validate.quality_chunks` held-out chunks and as many chunks spread over `data.second_eval`), for the
adapter itself instead of its merged checkpoint (the same function; merging changes float rounding only).
Tuning the recovery this way skips merge, export, validate's ONNX checks, serve and bench. Writes
DIR/adapter, DIR/result.json and prints one line per held-out text. `--original` trains the original itself
(every layer alone) with the same recovery: what the same training buys a model that lost nothing, i.e.
how much of a perplexity gain is the text rather than recovered quality.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from cqil.model import plan as plans
from cqil.model.cqil import CqilModel
from cqil.pipeline.build import _held_out_texts, _recovery_text, _split
from cqil.pipeline.build_config import BuildRecover, load_config, section_settings
from cqil.pipeline.commands import finetune as finetune_command
from cqil.pipeline.quality import evaluate
from cqil.pipeline.sources import load_model
from cqil.pipeline.stages import read_record

import cqil  # noqa: F401 - OpenMP's wait policy is set before PyTorch loads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, required=True, help="a finished build: its build.toml and plan")
    parser.add_argument("--out", type=Path, required=True, help="where the adapter and result.json go")
    parser.add_argument("--set", action="append", default=[], help="SECTION.KEY=VALUE over the build's config")
    parser.add_argument("--original", action="store_true", help="train the original (identity plan) instead")
    args = parser.parse_args()
    config = load_config(args.build / "build.toml", args.set)
    model_dir = Path(read_record(args.build / "source")["metrics"]["model_dir"])
    loaded = load_model(model_dir)
    loaded.path = model_dir
    loaded.model.config.name_or_path = loaded.model.name_or_path = str(model_dir)  # as the recover stage
    layers = loaded.model.config.num_hidden_layers
    plan = plans.identity_plan(layers) if args.original else plans.load_plan(args.build / "plan" / "plan.json", layers)

    started = time.perf_counter()
    split = _split(loaded, config, config["recover"]["seq_len"])
    settings = section_settings(config, "recover", BuildRecover)
    settings = dataclasses.replace(settings, eval_chunks=min(settings.eval_chunks, len(split.held_out)))
    record = finetune_command.run(settings, loaded, plan, _recovery_text(loaded, config, split), split.held_out,
                                  args.out / "adapter", checkpoint_dir=args.out / "checkpoint")
    seconds = time.perf_counter() - started

    loaded.model.eval()
    original = CqilModel(load_model(model_dir).model, plans.identity_plan(plan.num_layers))
    recovered = CqilModel(loaded.model, plan)  # the peft adapters sit in these modules, switched on
    result = {"set": args.set, "original": args.original, "steps": record["steps"],
              "seconds_per_step": record["seconds_per_step"], "seconds": round(seconds, 1), "curve": record["held_out"]}
    texts = _held_out_texts(loaded, config, _split(loaded, config), config["validate"]["quality_chunks"])
    for name, chunks in texts.items():
        metrics = evaluate(original, {"recovered": recovered}, chunks, progress=False)
        ours, theirs = metrics["recovered"], metrics["original"]
        result[name] = {"ppl": ours["ppl"], "original_ppl": theirs["ppl"], "ratio": ours["ppl"] / theirs["ppl"],
                        "kl": ours["kl"], "top1": ours["top1"]}
        print(f"{name}: PPL {ours['ppl']:.3f} = {ours['ppl'] / theirs['ppl']:.3f} x the original's "
              f"({theirs['ppl']:.3f}), KL {ours['kl']:.4f}, top-1 {ours['top1']:.3f}")
    (args.out / "result.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
