"""What `cqil validate` and `cqil bench` share: the ONNX to test, its plan, and the PyTorch model it came from."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cqil.model.errors import CqilError
from cqil.model.fsutil import atomic_write_text
from cqil.model.plan import load_plan, plan_from_config
from cqil.pipeline.sources import load_model


def onnx_and_plan(args: argparse.Namespace):
    """The ONNX file, its contract, and its plan (checked against --plan when given)."""
    from cqil.export.contract import find_onnx, read_contract

    onnx_path = find_onnx(args.onnx)
    spec = read_contract(onnx_path)
    plan = spec.plan
    if args.plan is not None:
        given = load_plan(args.plan, spec.num_layers)
        if plan is not None and (given.groups, given.bypass) != (plan.groups, plan.bypass):
            raise CqilError(f"--plan {args.plan} ({given.describe()}) is not the plan '{onnx_path}' was exported "
                            f"with ({plan.describe()}): drop --plan or pass the matching ONNX")
        plan = plan or given
    if plan is None:
        raise CqilError(f"'{onnx_path}' carries no cqil.plan metadata: pass --plan with the plan it was exported with")
    return onnx_path, spec, plan


def load_source(args: argparse.Namespace, spec, onnx_path: Path, plan):
    """The model to compare with: --model, else the one recorded in the ONNX (cqil.source_model)."""
    source = args.model or spec.source_model().get("path")
    if not source:
        raise CqilError(f"'{onnx_path}' does not record its source model: pass --model")
    if not args.model and not Path(source).exists():
        raise CqilError(f"the source model recorded in '{onnx_path}' ({source}) is gone: pass --model")
    loaded = load_model(source)
    plan.check_fits(loaded.model.config)
    own = plan_from_config(loaded.model.config)
    if own is not None and (own.groups, own.bypass) != (plan.groups, plan.bypass):
        raise CqilError(f"--model carries its own plan ({own.describe()}), not the ONNX's ({plan.describe()}): "
                        "pass the checkpoint the ONNX was exported from")
    return loaded


def write_json(path: Path | None, result: dict) -> None:
    if path is not None:
        atomic_write_text(path, json.dumps(result, indent=2) + "\n")
