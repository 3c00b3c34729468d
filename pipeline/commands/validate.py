"""`cqil validate`: outputs of each engine vs the PyTorch reference (exit 1 when a check fails)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from cqil.model.settings import NON_NEGATIVE, POSITIVE, setting
from cqil.pipeline.commands.onnx_source import load_source, onnx_and_plan, write_json
from cqil.pipeline.commands.options import (
    INPUT_PATH,
    JSON_FILE,
    OUTPUT_FILE,
    DataSettings,
    add_model_options,
    input_file,
)
from cqil.pipeline.data import load_split
from cqil.pipeline.settings import add_flags, from_args


@dataclass(frozen=True)
class ValidateSettings:
    """How much of the held-out text each engine is compared on (`cqil validate`, the build's [validate])."""

    chunks: int = setting(2, "held-out chunks to compare on (default %(default)s)", check=POSITIVE)
    decode_steps: int = setting(8, "last tokens of each chunk decoded one by one with the cache (default "
                                "%(default)s)", check=NON_NEGATIVE)
    threads: int | None = setting(None, "ONNX Runtime intra-op threads", check=POSITIVE, toml=False)


def cmd_validate(args: argparse.Namespace) -> int:
    from cqil.engines.greedy_agreement import prompt_ids
    from cqil.engines.validate import summary_lines
    from cqil.model.cqil import CqilModel

    onnx_path, spec, plan = onnx_and_plan(args)
    loaded = load_source(args, spec, onnx_path, plan)
    held_out = load_split(loaded.tokenizer, args.data, args.eval_data, args.seq_len).held_out
    result = run(from_args(ValidateSettings, args), onnx_path, CqilModel(loaded.model, plan), held_out, args.engine,
                 greedy_prompts=prompt_ids(loaded.tokenizer))
    result["reference_model"] = {"name": loaded.name, "path": str(loaded.path)}
    write_json(args.out, result)
    print(json.dumps(result, indent=2) if args.json else "\n".join(summary_lines(result)))
    return 0 if result["passed"] else 1


def run(settings: ValidateSettings, onnx: Path, reference, held_out, engine: Path | None = None,
        greedy_prompts: tuple = ()) -> dict:
    """The ONNX (and the TensorRT `engine`, where given) against the PyTorch `reference` CqilModel on the
    first `settings.chunks` held-out chunks, and, for quantized weights, greedy-token agreement on
    `greedy_prompts`: the validation record. What both `cqil validate` and the build's validate stage run."""
    from cqil.engines.validate import validate_onnx

    return validate_onnx(onnx, reference, held_out[: settings.chunks], settings.decode_steps, engine=engine,
                         threads=settings.threads, greedy_prompts=greedy_prompts)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="outputs of each engine vs the PyTorch reference (exit 1 on failure)")
    p.add_argument("--onnx", type=INPUT_PATH, required=True, help="the folder (or .onnx file) written by cqil export")
    add_model_options(p)
    p.add_argument("--plan", type=JSON_FILE, help="plan.json; must match the plan stored in the ONNX")
    p.add_argument("--engine", type=input_file("build it with `cqil engine`"),
                   help="a TensorRT engine of the same ONNX (validated where TensorRT imports)")
    add_flags(p, DataSettings, only=("data", "eval_data", "seq_len"), defaults={"seq_len": 128})
    add_flags(p, ValidateSettings)
    p.add_argument("--out", type=OUTPUT_FILE, help="write the result JSON here (e.g. validation.json)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_validate)
