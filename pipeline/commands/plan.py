"""`cqil plan`: write plan.json from explicit groups, a uniform spec, an official config, or the --auto search."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from cqil.model.errors import CqilError
from cqil.model.settings import POSITIVE, TEXT, at_least, number, setting
from cqil.pipeline.commands.options import (
    OUTPUT_FILE,
    add_data_options,
    add_model_options,
    add_plan_options,
    limit_chunks,
)
from cqil.pipeline.plan_choice import PlanChoice
from cqil.pipeline.settings import add_flags, from_args


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


def cmd_plan(args: argparse.Namespace) -> None:
    from cqil.pipeline.plan_choice import config_and_plan

    if not args.auto and (args.target_depth is not None or args.max_kl is not None):
        raise CqilError("--target-depth and --max-kl choose an automatic plan: add --auto")
    if PlanChoice.from_args(args).check() == "auto":
        return _auto_plan(args)
    _, plan = config_and_plan(args)
    plan.save(args.out)
    print(f"{args.out}: {plan.describe()}")


def search(settings: AutoPlanSettings, loaded, split, batch_size: int | None = None):
    """The automatic search on the loaded model's calibration and held-out text: autoplan's SearchResult.
    What both `cqil plan --auto` and the build's plan stage run."""
    from cqil.model.cqil import CqilModel
    from cqil.model.plan import identity_plan, model_record
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
    from cqil.model.fsutil import atomic_write_text, check_output_file
    from cqil.pipeline.data import load_split
    from cqil.pipeline.plan_choice import resolve_plan
    from cqil.pipeline.sources import load_model

    table = args.out.with_suffix(".search.json")
    check_output_file(table, "--out")
    settings = from_args(AutoPlanSettings, args, calibration_chunks=args.max_chunks)
    loaded = load_model(args.model)
    settings.request().check(loaded.model.config.num_hidden_layers)  # before the text is read
    split = load_split(loaded.tokenizer, args.data, args.eval_data, args.seq_len)
    result = search(settings, loaded, split, args.batch_size)
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
    add_data_options(p)
    # --max-chunks: the calibration chunks scored
    p.set_defaults(max_chunks=AutoPlanSettings.calibration_chunks, func=cmd_plan)
