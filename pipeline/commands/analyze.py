"""`cqil analyze`: layer-input cosine similarity on calibration text (JSON + heatmap PNG)."""

from __future__ import annotations

import argparse
import json

from cqil.pipeline.commands.options import OUTPUT_DIR, add_data_options, add_model_options, limit_chunks


def cmd_analyze(args: argparse.Namespace) -> None:
    from cqil.model.cqil import CqilModel
    from cqil.model.fsutil import atomic_dir
    from cqil.model.plan import identity_plan
    from cqil.pipeline.analysis import layer_input_similarity, save_heatmap, similarity_report
    from cqil.pipeline.data import load_split
    from cqil.pipeline.sources import load_model

    loaded = load_model(args.model)
    split = load_split(loaded.tokenizer, args.data, args.eval_data, args.seq_len)
    chunks = limit_chunks(split.train, args.max_chunks)
    model = CqilModel(loaded.model, identity_plan(loaded.model.config.num_hidden_layers))
    matrix = layer_input_similarity(model, chunks, args.batch_size)
    report = similarity_report(matrix, chunks.numel(), loaded.name)
    report["data"] = split.source
    with atomic_dir(args.out) as tmp:
        (tmp / "similarity.json").write_text(json.dumps(report, indent=2) + "\n")
        save_heatmap(matrix, tmp / "similarity.png",
                     f"{loaded.name}: layer-input cosine similarity ({chunks.numel()} tokens)")
    print(f"layer-input cosine similarity, {loaded.name}, {chunks.numel()} tokens")
    print(" layer  cos(x_i, x_i+1)")
    for i, value in enumerate(report["adjacent"]):
        print(f"{i:>3}-{i + 1:<3} {value:.4f}  {'#' * round(40 * max(value, 0))}")
    print(f"wrote {args.out}/similarity.json and similarity.png")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="layer-input cosine similarity (JSON + heatmap PNG)")
    add_model_options(p)
    add_data_options(p)
    p.set_defaults(max_chunks=32)
    p.add_argument("--out", type=OUTPUT_DIR, default="analysis", help="output directory (default %(default)s)")
    p.set_defaults(func=cmd_analyze)
