"""`cqil bench`: latency of the original vs the CQIL model on ONNX Runtime, interleaved."""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cqil.engines.bench_report import plot_bench, report_lines
from cqil.engines.bench_settings import BenchSettings
from cqil.export.choices import LAYOUTS
from cqil.model.errors import CqilError
from cqil.model.fsutil import check_output_file
from cqil.model.plan import identity_plan, model_record
from cqil.model.settings import NON_NEGATIVE, POSITIVE, Check, at_least, check_fields, one_of, setting
from cqil.pipeline.commands.onnx_source import load_source, onnx_and_plan, write_json
from cqil.pipeline.commands.options import INPUT_PATH, JSON_FILE, OUTPUT_FILE, add_model_options
from cqil.pipeline.commands.ranks import add_rank_options, launch_bench
from cqil.pipeline.settings import add_flags, from_args
from cqil.pipeline.sources import load_model


@dataclass(frozen=True)
class BenchOutput:
    """Where a bench result goes (`cqil bench` and rank 0 of `cqil bench --ranks P`)."""

    out: Path | None = setting(None, "write the cqil-bench/1 JSON here (e.g. latency.json; chart beside it)",
                               check=OUTPUT_FILE, toml=False)
    chart: Path | None = setting(None, "PNG chart path (default: --out with .png)", check=OUTPUT_FILE, toml=False)
    json: bool = setting(False, "print the result as JSON", toml=False)

    def chart_path(self) -> Path | None:
        return self.chart or (self.out.with_suffix(".png") if self.out else None)


def _layouts(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))


LAYOUT_LIST = Check(_layouts, "a list of layouts", lambda v: bool(v) and set(v) <= set(LAYOUTS),
                    f"must list {' and/or '.join(LAYOUTS)}")


@dataclass(frozen=True)
class CostModelOutput:
    """`cqil bench --cost-model COST.json`: what the cost model of `cqil plan --auto --latency-budget` measures.
    Not build keys: the build's plan stage does not run the latency-budget search."""

    cost_model: Path | None = setting(None, "measure per-layer and per-group decode costs of --model on ONNX Runtime "
                                      "CPU into this file", check=OUTPUT_FILE, metavar="COST.json", toml=False)
    cost_max_group_size: int = setting(4, "largest group measured (default %(default)s)", check=at_least(2),
                                       metavar="P", toml=False)
    cost_layouts: tuple[str, ...] = setting(LAYOUTS, "export layouts measured (default %(default)s)",
                                            check=LAYOUT_LIST, metavar="L,...", toml=False)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class CostTarget:
    """Where `cqil bench --cost-model` measures; `--ranks P` measures P torch.distributed ranks instead."""

    cost_device: str = setting("cpu", "cpu: ONNX Runtime on this CPU (default); cuda: PyTorch on the CUDA GPU, a "
                               "stream per branch, CUDA-graph decode steps", check=one_of("cpu", "cuda"),
                               metavar="{cpu,cuda}", toml=False)


@dataclass(frozen=True)
class RankCostSettings:
    """What every rank of `cqil bench --cost-model COST.json --ranks P` times (the rank worker's options)."""

    cost_model: Path | None = setting(None, "write the cost model here (rank 0)", check=OUTPUT_FILE, toml=False)
    past: int = setting(128, "decode context length (default %(default)s)", check=POSITIVE, toml=False)
    decode_repeats: int = setting(100, "timed decode rounds (default %(default)s)", check=POSITIVE, toml=False)
    warmup: int = setting(3, "untimed rounds first (default %(default)s)", check=NON_NEGATIVE, toml=False)
    threads: int = setting(1, "torch threads of each rank (default %(default)s)", check=POSITIVE, toml=False)
    cost_max_group_size: int = setting(4, "largest group measured, at most the ranks (default %(default)s)",
                                       check=at_least(2), toml=False)

    def cost_settings(self):
        from cqil.engines.cost_model import CostSettings

        return CostSettings(past=self.past, repeats=self.decode_repeats, warmup=self.warmup,
                            max_group_size=self.cost_max_group_size, layouts=("branches", "fused"),
                            threads=self.threads)


def cmd_bench(args: argparse.Namespace) -> int | None:
    cost = from_args(CostModelOutput, args)
    if cost.cost_model is not None:
        return _cost_model(args, cost)
    settings, output = from_args(BenchSettings, args), from_args(BenchOutput, args)
    if args.ranks is not None:  # --ranks P: one process vs TP vs CQIL on P processes (pipeline/commands/ranks.py)
        if settings.schedule != "sequential":
            raise CqilError(f"--schedule {settings.schedule} is for the one-process PyTorch rows; --ranks runs "
                            "CQIL's per-rank schedule: drop one of them")
        return launch_bench(args, settings, output)
    if args.onnx is None:
        raise CqilError("--onnx is required (or --ranks P for the multi-process bench of the PyTorch model)")
    from cqil.engines.bench import schedule_models
    from cqil.pipeline.reference import cached_reference

    if output.chart_path() is not None:
        check_output_file(output.chart_path(), "--chart")
    onnx_path, spec, plan = onnx_and_plan(args)
    reference = args.reference or cached_reference(spec, onnx_path, args.model)
    torch_models = None
    if not args.no_torch:
        loaded = load_source(args, spec, onnx_path, plan)
        torch_models = schedule_models(loaded.model, plan, settings.schedule)
    result = run(settings, onnx_path, reference, torch_models, output)
    if output.json:
        print(json.dumps(result, indent=2))
        return
    print("\n".join(report_lines(result, f"{onnx_path} ({result['candidate']['plan']}) vs {result['reference']['onnx']}, "
                                          f"{', '.join(result['providers'])}, threads {settings.threads or 'default'}, "
                                          f"PyTorch schedule {settings.schedule}")))


def run(settings: BenchSettings, onnx_path: Path, reference: Path, torch_models: dict | None,
        output: BenchOutput) -> dict:
    """Time the candidate ONNX against the reference (and the eager models, when given); write the JSON and
    the chart that `output` names. What both `cqil bench` and the build's bench stage run."""
    from cqil.engines.bench import run_bench

    result = run_bench(onnx_path, reference, settings, torch_models)
    chart = output.chart_path()
    if chart is not None:
        plot_bench(result, chart)
        result["chart"] = str(chart)
    write_json(output.out, result)
    return result


def _cost_model(args: argparse.Namespace, cost: CostModelOutput) -> int | None:
    """`--cost-model COST.json`: per-layer and per-group decode costs (engines/cost_model.py) on ONNX Runtime CPU,
    on P ranks (`--ranks P`) or on a CUDA GPU (`--cost-device cuda`)."""
    from cqil.engines.cost_model import CostSettings, measure_cost_model, measure_device_cost_model, save_cost_model
    from cqil.model.cqil import CqilModel

    device = from_args(CostTarget, args).cost_device
    if args.onnx is not None:
        raise CqilError("--cost-model exports and times cut models of --model itself: drop --onnx")
    if args.ranks is not None:
        if device != "cpu":
            raise CqilError("--ranks P measures the ranks' devices (gloo: CPU, nccl: a GPU each): drop --cost-device")
        return _rank_cost_model(args, cost)
    settings = CostSettings(past=args.past, repeats=args.decode_repeats, warmup=args.warmup,
                            max_group_size=cost.cost_max_group_size, layouts=cost.cost_layouts, threads=args.threads)
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise CqilError("--cost-device cuda needs a CUDA GPU and none is visible here: leave it out (ONNX "
                            "Runtime CPU) or use --ranks P")
    loaded = load_model(args.model)
    config = loaded.model.config
    original = CqilModel(loaded.model, identity_plan(config.num_hidden_layers, model_record(config)))
    if device == "cuda":
        model = measure_device_cost_model(original, settings, "cuda")
    else:
        threads = f"{args.threads} threads" if args.threads else "default threads"
        with tempfile.TemporaryDirectory(prefix="cqil-cost-") as workdir:
            model = measure_cost_model(original, f"onnxruntime-cpu ({threads})", settings, Path(workdir))
    save_cost_model(model, cost.cost_model)
    print("\n".join(cost_model_lines(cost.cost_model, loaded.name, model, config.num_hidden_layers)))


def cost_model_lines(path: Path, name: str, model, num_layers: int) -> list[str]:
    """What `cqil bench --cost-model` prints: the costs, and what each group size saves of the original's step."""
    original_step = model.original(num_layers)
    lines = [(f"{path}: {name} on {model.target}, decode step over {model.details.get('past')} past tokens: "
              f"base {model.base * 1e3:.3f} ms, layer {model.layer * 1e3:.3f} ms, "
              f"original {original_step * 1e3:.2f} ms")]
    for layout, sizes in model.groups.items():
        row = ", ".join(f"p={p}: {s * 1e3:.3f} ms (saves {(p * model.layer - s) / original_step:.1%})"
                        for p, s in sorted(sizes.items()))
        lines.append(f"  {layout}: {row}")
    return lines


def _rank_cost_model(args: argparse.Namespace, cost: CostModelOutput) -> int:
    """`--cost-model COST.json --ranks P`: the cost model measured by P rank processes (pipeline/rank_worker.py)."""
    from cqil.engines.distributed.launch import check_backend
    from cqil.pipeline.commands.ranks import RankOptions, launch
    from cqil.pipeline.settings import to_argv
    from cqil.pipeline.sources import check_model_dir, resolve_model_dir

    if args.ranks < 2:
        raise CqilError(f"--ranks {args.ranks}: a cost model on ranks needs at least 2 (a group's layers run on "
                        "different ranks); leave --ranks out for one process")
    check_backend(args.backend)
    check_output_file(cost.cost_model, "--cost-model")
    path = resolve_model_dir(args.model)
    check_model_dir(path)
    settings = RankCostSettings(cost.cost_model, args.past, args.decode_repeats, args.warmup, args.threads or 1,
                                min(cost.cost_max_group_size, args.ranks))
    return launch(args.ranks, ["cost-model", "--model", str(path),
                               *to_argv(from_args(RankOptions, args), skip=("ranks",)), *to_argv(settings)])


def register(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="latency of the original vs the CQIL model on ONNX Runtime, interleaved")
    b.add_argument("--onnx", type=INPUT_PATH, help="the candidate (CQIL) folder written by cqil export (required without --ranks)")
    b.add_argument("--reference", type=INPUT_PATH,
                   help="the original model's ONNX folder (default: exported once into the CQIL cache)")
    add_model_options(b)
    b.add_argument("--plan", type=JSON_FILE, help="plan.json; must match the plan stored in the ONNX")
    add_flags(b, BenchSettings)
    b.add_argument("--no-torch", action="store_true", help="skip the eager PyTorch rows")
    add_flags(b, BenchOutput)
    cost = b.add_argument_group("cost model (for `cqil plan --auto --latency-budget`; not a build key)")
    add_flags(cost, CostModelOutput)
    add_flags(cost, CostTarget)
    add_rank_options(b, plan_options=True)
    b.set_defaults(func=cmd_bench)
