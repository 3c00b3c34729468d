"""`cqil analyze`: layer-input cosine similarity on calibration text (JSON + heatmap PNG)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cqil.model.fsutil import atomic_dir
from cqil.model.plan import identity_plan
from cqil.pipeline.commands.options import OUTPUT_DIR, DataSettings, add_data_options, add_model_options, limit_chunks
from cqil.pipeline.data import load_split
from cqil.pipeline.settings import from_args
from cqil.pipeline.sources import load_model


def cmd_analyze(args: argparse.Namespace) -> None:
    settings = from_args(DataSettings, args)
    loaded = load_model(args.model)
    split = load_split(loaded.tokenizer, settings.data, settings.eval_data, settings.seq_len)
    with atomic_dir(args.out) as tmp:
        report = run(settings, loaded, split, tmp)
    print(f"layer-input cosine similarity, {loaded.name}, {report['tokens']} tokens")
    print(" layer  cos(x_i, x_i+1)")
    for i, value in enumerate(report["adjacent"]):
        print(f"{i:>3}-{i + 1:<3} {value:.4f}  {'#' * round(40 * max(value, 0))}")
    print(f"wrote {args.out}/similarity.json and similarity.png")


def run(settings: DataSettings, loaded, split, folder: Path) -> dict:
    """Layer-input similarity of the loaded model on the first `max_chunks` training chunks, written into
    `folder` as similarity.json and similarity.png: what `cqil analyze` and the build's analyze stage run."""
    from cqil.model.cqil import CqilModel
    from cqil.pipeline.analysis import layer_input_similarity, save_heatmap, similarity_report

    chunks = limit_chunks(split.train, settings.max_chunks)
    model = CqilModel(loaded.model, identity_plan(loaded.model.config.num_hidden_layers))
    matrix = layer_input_similarity(model, chunks, settings.batch_size)
    report = {**similarity_report(matrix, chunks.numel(), loaded.name), "data": split.source}
    (folder / "similarity.json").write_text(json.dumps(report, indent=2) + "\n")
    save_heatmap(matrix, folder / "similarity.png",
                 f"{loaded.name}: layer-input cosine similarity ({chunks.numel()} tokens)")
    return report


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="layer-input cosine similarity (JSON + heatmap PNG)")
    add_model_options(p)
    add_data_options(p)
    p.set_defaults(max_chunks=32)
    p.add_argument("--out", type=OUTPUT_DIR, default="analysis", help="output directory (default %(default)s)")
    p.set_defaults(func=cmd_analyze)
