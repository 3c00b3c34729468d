"""`cqil plan`: write plan.json from explicit groups, a uniform spec, an official config, or the --auto search."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cqil.engines.cost_model import ONNX_CPU, load_cost_model
from cqil.export.choices import LAYOUTS
from cqil.model.errors import CqilError
from cqil.model.fsutil import atomic_write_text, check_output_file
from cqil.model.plan import PRUNE_METHODS, identity_plan, model_record, pruned_plan
from cqil.model.settings import POSITIVE, TEXT, at_least, check_fields, number, one_of, setting
from cqil.pipeline.commands.options import (
    JSON_FILE,
    OUTPUT_FILE,
    add_data_options,
    add_model_options,
    add_plan_options,
    limit_chunks,
)
from cqil.pipeline.data import load_split
from cqil.pipeline.plan_choice import PlanChoice, config_and_plan, resolve_plan
from cqil.pipeline.settings import add_flags, from_args
from cqil.pipeline.sources import load_model


@dataclass(frozen=True)
class AutoPlanSettings:
    """The automatic search's budget and effort (`cqil plan --auto`, the build's [plan] section)."""

    target_depth: int | None = setting(None, "number of groups wanted", check=POSITIVE, metavar="N", unset=0)
    max_kl: float | None = setting(None, "budget on held-out KL(original || plan), nats/token",
                                   check=number(lambda v: v > 0, "must be positive"), metavar="X", unset=0.0)
    max_group_size: int = setting(2, "largest group (default %(default)s)", check=at_least(2), metavar="P")
    bypass_choices: str = setting("1", "bypass distances to try (default %(default)s)", check=TEXT, metavar="D,...")
    proxy_keep: float = setting(1.0, "measure only this fraction of each size's candidates, those whose layer "
                                "inputs are most alike (default %(default)s: all)",
                                check=number(lambda v: 0 < v <= 1, "must be in (0, 1]"), metavar="F")
    head_every: int = setting(4, "score the KL at every K-th position only (default %(default)s; 1 = all)",
                              check=POSITIVE, metavar="K")
    eval_chunks: int | None = setting(None, "held-out chunks for verification (default: all)", check=POSITIVE,
                                      metavar="N", unset=0)
    # calibration chunks for scoring: `cqil plan`'s --max-chunks
    calibration_chunks: int = setting(4, "calibration chunks scored", check=POSITIVE, flags=())

    def request(self):
        from cqil.pipeline.autoplan import SearchRequest, parse_bypass_choices

        return SearchRequest(self.target_depth, self.max_kl, self.max_group_size,
                             parse_bypass_choices(self.bypass_choices), self.proxy_keep, self.head_every)


@dataclass(frozen=True)
class FrontierLatency:
    """The frontier's measured latency (`cqil plan --auto --latency-budget R --cost-model C --measure-latency`)."""

    measure_latency: bool = setting(False, "also export every frontier plan and time its decode step against the "
                                    "original's on ONNX Runtime CPU (the cost model's threads and past length)",
                                    toml=False)
    latency_repeats: int = setting(50, "timed decode rounds per plan for --measure-latency (default %(default)s)",
                                   check=POSITIVE, metavar="N", toml=False)


@dataclass(frozen=True)
class LatencySettings:
    """The latency-budget search (`cqil plan --auto --latency-budget R`, pipeline/hybrid.py). Not build keys:
    the build's plan stage runs the KL-budget search, and a cost model is measured per machine."""

    latency_budget: float | None = setting(None, "hybrid plan (layers alone, grouped or dropped) whose predicted "
                                           "decode latency is at most R x the original's under --cost-model",
                                           check=number(lambda v: 0 < v <= 1, "must be in (0, 1]"), metavar="R",
                                           toml=False)
    cost_model: Path | None = setting(None, "the target's costs, measured by `cqil bench --cost-model`",
                                      check=JSON_FILE, metavar="COST.json", toml=False)
    layout: str = setting(LAYOUTS[0], "export layout whose group costs the search uses (default %(default)s)",
                          check=one_of(*LAYOUTS), metavar="{" + ",".join(LAYOUTS) + "}", toml=False)

    def __post_init__(self) -> None:
        check_fields(self)
        if (self.latency_budget is None) != (self.cost_model is None):
            raise CqilError("--latency-budget R and --cost-model COST.json go together (measure one with "
                            "`cqil bench --cost-model`)")


@dataclass(frozen=True)
class PruneSettings:
    """Depth pruning (`cqil plan --prune K`, pipeline/prune.py): the baseline CQIL is compared with; not a build
    key (the build ships a CQIL plan)."""

    prune: int | None = setting(None, "drop K decoder layers chosen on calibration text", check=POSITIVE,
                                metavar="K", toml=False)
    method: str | None = setting(None, "block-influence: ShortGPT's least-changing layers; greedy: SLEB-style, one "
                                 "layer at a time by calibration KL (default greedy)",
                                 check=one_of(*PRUNE_METHODS), metavar="{" + ",".join(PRUNE_METHODS) + "}",
                                 toml=False)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.method is not None and self.prune is None:
            raise CqilError("--method chooses how --prune K picks the layers: add --prune K")


def cmd_plan(args: argparse.Namespace) -> None:
    latency = from_args(LatencySettings, args)
    if not args.auto and (args.target_depth is not None or args.max_kl is not None
                          or latency.latency_budget is not None):
        raise CqilError("--target-depth, --max-kl and --latency-budget choose an automatic plan: add --auto")
    if from_args(FrontierLatency, args).measure_latency and latency.latency_budget is None:
        raise CqilError("--measure-latency times the plans of a --latency-budget search: add --latency-budget R")
    choice = PlanChoice.from_args(args)
    pruning = from_args(PruneSettings, args)
    if pruning.prune is not None:
        if choice.given():
            raise CqilError(f"--prune chooses the plan itself: drop {', '.join('--' + g for g in choice.given())}")
        return _pruned_plan(args, pruning)
    if choice.check() == "auto":
        if latency.latency_budget is not None:
            return _latency_plan(args, latency)
        return _auto_plan(args)
    _, plan = config_and_plan(args)
    plan.save(args.out)
    print(f"{args.out}: {plan.describe()}")


def run(settings: AutoPlanSettings, loaded, split, batch_size: int | None = None):
    """The automatic search on the loaded model's calibration and held-out text: autoplan's SearchResult.
    What both `cqil plan --auto` and the build's plan stage run."""
    from cqil.model.cqil import CqilModel
    from cqil.pipeline import autoplan

    config = loaded.model.config
    request = settings.request()
    request.check(config.num_hidden_layers)
    calibration = split.train[: settings.calibration_chunks]
    held_out = limit_chunks(split.held_out, settings.eval_chunks)
    original = CqilModel(loaded.model, identity_plan(config.num_hidden_layers))
    extra = {} if batch_size is None else {"batch_size": batch_size}
    return autoplan.search(original, calibration, held_out, request, model_record(config), **extra)


def _auto_plan(args: argparse.Namespace) -> None:
    table = args.out.with_suffix(".search.json")
    check_output_file(table, "--out")
    settings = from_args(AutoPlanSettings, args, calibration_chunks=args.max_chunks)
    loaded = load_model(args.model)
    settings.request().check(loaded.model.config.num_hidden_layers)  # before the text is read
    split = load_split(loaded.tokenizer, args.data, args.eval_data, args.seq_len)
    result = run(settings, loaded, split, args.batch_size)
    plan = resolve_plan(PlanChoice.from_args(args), loaded.model.config, search=lambda: result.plan)
    report = {"model": loaded.name, "data": split.source, **result.report}
    atomic_write_text(table, json.dumps(report, indent=2) + "\n")
    plan.save(args.out)
    calibration = split.train[: settings.calibration_chunks]
    held_out = limit_chunks(split.held_out, settings.eval_chunks)
    measured = report["measured"]
    print(f"{loaded.name}: {len(report['candidates'])} candidate groups scored on {len(calibration)} "
          f"calibration chunks, verified on {len(held_out)} held-out chunks")
    for step in report["steps"]:
        spans = ",".join(f"{g[0]}-{g[-1]}" for g in step["groups"]) or "none"
        print(f"  depth {step['depth']:>3} d={step['bypass']}  predicted KL {step['predicted_kl']:.4f}  "
              f"measured KL {step['measured']['kl']:.4f}  ppl {step['measured']['ppl']:.3f}  groups {spans}")
    print(f"{args.out}: {plan.describe()}; held-out KL {measured['kl']:.4f}, "
          f"ppl {measured['ppl']:.3f} (original {measured['original_ppl']:.3f}); scoring {result.seconds['score']:.0f} s, "
          f"verification {result.seconds['verify']:.0f} s")
    print(f"candidate table: {table}")


def _latency_plan(args: argparse.Namespace, latency: LatencySettings) -> None:
    from cqil.model.cqil import CqilModel
    from cqil.pipeline.autoplan import parse_bypass_choices
    from cqil.pipeline.hybrid import add_measured_latency, save_frontier_chart, search

    if args.target_depth is not None or args.max_kl is not None:
        raise CqilError("--latency-budget is the budget of this search: drop --target-depth / --max-kl")
    cost_model = load_cost_model(latency.cost_model)
    frontier_latency = from_args(FrontierLatency, args)
    if frontier_latency.measure_latency and cost_model.engine != ONNX_CPU:
        raise CqilError(f"--measure-latency times plans on ONNX Runtime CPU, and '{latency.cost_model}' was measured "
                        f"on '{cost_model.target}': leave --measure-latency out")
    bypass_choices = parse_bypass_choices(args.bypass_choices)
    table, frontier_json = args.out.with_suffix(".search.json"), args.out.with_suffix(".pareto.json")
    chart = args.out.with_suffix(".pareto.png")
    for path in (table, frontier_json, chart):
        check_output_file(path, "--out")
    loaded = load_model(args.model)
    config = loaded.model.config
    if args.max_group_size > config.num_hidden_layers:
        raise CqilError(f"--max-group-size {args.max_group_size} must be in 2..{config.num_hidden_layers}")
    split = load_split(loaded.tokenizer, args.data, args.eval_data, args.seq_len)
    calibration = limit_chunks(split.train, args.max_chunks)
    held_out = limit_chunks(split.held_out, args.eval_chunks)
    original = CqilModel(loaded.model, identity_plan(config.num_hidden_layers))
    result = search(original, calibration, held_out, cost_model, latency.latency_budget, model_record(config),
                    args.max_group_size, bypass_choices, latency.layout, args.head_every, args.batch_size)
    if frontier_latency.measure_latency:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="cqil-frontier-") as workdir:
            add_measured_latency(result, original, cost_model, frontier_latency.latency_repeats, latency.layout,
                                 Path(workdir))
        result.seconds["latency"] = round(time.perf_counter() - started, 1)
    atomic_write_text(table, json.dumps({"model": loaded.name, "data": split.source, **result.report}, indent=2) + "\n")
    atomic_write_text(frontier_json, json.dumps({"model": loaded.name, **result.frontier}, indent=2) + "\n")
    save_frontier_chart(result.frontier, chart, f"{loaded.name}: held-out KL vs decode latency ratio")
    result.plan.save(args.out)
    measured = result.report["measured"]
    print(f"{args.out}: {result.plan.describe()}; predicted latency ratio "
          f"{result.plan.latency['predicted_ratio']:.3f} (budget {latency.latency_budget}, {cost_model.target}); "
          f"held-out KL {measured['kl']:.4f}, ppl {measured['ppl']:.3f} (original {measured['original_ppl']:.3f}); "
          f"scoring {result.seconds['score']:.0f} s, verification {result.seconds['verify']:.0f} s, "
          f"held-out {result.seconds['measure']:.0f} s")
    if "latency" in result.seconds:
        print(f"  measured latency of {result.frontier['measured_latency']['plans']} distinct plans against the "
              f"original: {result.seconds['latency']:.0f} s (below: predicted/measured ratio)")
    for kind, points in result.frontier["kinds"].items():
        row = ", ".join(f"{p['predicted_ratio']:.3f}" + (f"/{p['measured_ratio']:.3f}" if "measured_ratio" in p else "")
                        + f": KL {p['held_out']['kl']:.3f}" for p in points) or "no plan fits"
        print(f"  {kind:>6}  {row}")
    print(f"search table: {table}; Pareto frontier: {frontier_json}, {chart}")


def _pruned_plan(args: argparse.Namespace, pruning: PruneSettings) -> None:
    from cqil.model.cqil import CqilModel
    from cqil.pipeline.prune import check_count, choose
    from cqil.pipeline.quality import evaluate

    table = args.out.with_suffix(".prune.json")
    check_output_file(table, "--out")
    loaded = load_model(args.model)
    config = loaded.model.config
    check_count(pruning.prune, config.num_hidden_layers)
    split = load_split(loaded.tokenizer, args.data, args.eval_data, args.seq_len)
    calibration = limit_chunks(split.train, args.max_chunks)
    held_out = limit_chunks(split.held_out, args.eval_chunks)
    original = CqilModel(loaded.model, identity_plan(config.num_hidden_layers))
    method = pruning.method or "greedy"
    chosen = choose(method, original, calibration, pruning.prune, args.batch_size, args.head_every)
    plan = pruned_plan(list(chosen.dropped), config.num_hidden_layers, model_record(config))
    result = evaluate(original, {"pruned": original.with_plan(plan)}, held_out, args.batch_size)
    measured = {"kl": result["pruned"]["kl"], "ppl": result["pruned"]["ppl"], "top1": result["pruned"]["top1"],
                "original_ppl": result["original"]["ppl"]}
    report = {"model": loaded.name, "data": split.source, **chosen.to_dict(),
              "calibration": {"chunks": len(calibration), "tokens": calibration.numel()},
              "held_out": {"chunks": len(held_out), "tokens": held_out.numel()}, "plan": plan.to_dict(),
              "measured": measured}
    atomic_write_text(table, json.dumps(report, indent=2) + "\n")
    plan.save(args.out)
    print(f"{args.out}: {plan.describe()} ({method}, chosen on {len(calibration)} calibration chunks); held-out "
          f"KL {measured['kl']:.4f}, ppl {measured['ppl']:.3f} (original {measured['original_ppl']:.3f})")
    print(f"selection table: {table}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="write plan.json from explicit groups, a uniform S:E:P spec, an official "
                       "config, or --auto search")
    add_model_options(p)
    add_plan_options(p)
    add_flags(p, PlanChoice, only=("official",))
    p.add_argument("--out", type=OUTPUT_FILE, default="plan.json", help="output file (default %(default)s)")
    group = p.add_argument_group("automatic plan (--auto; see docs/autoplan.md)")
    group.add_argument("--auto", action="store_true", help="search the plan on calibration text")
    add_flags(group, AutoPlanSettings)
    add_flags(group, LatencySettings)
    add_flags(group, FrontierLatency)
    add_flags(p.add_argument_group("depth pruning (--prune; the baseline to compare CQIL with)"), PruneSettings)
    add_data_options(p)
    # --max-chunks: the calibration chunks scored
    p.set_defaults(max_chunks=AutoPlanSettings.calibration_chunks, func=cmd_plan)
