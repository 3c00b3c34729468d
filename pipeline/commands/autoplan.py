"""`cqil plan --auto`: the options and the command; `cqil plan` (commands/core.py) dispatches here."""

from __future__ import annotations

import argparse
import json

from pipeline.cli import add_data_options, limit_chunks
from pipeline.model.errors import CqilError


def add_auto_options(parser: argparse.ArgumentParser) -> None:
    from pipeline.build_config import DEFAULTS  # the fast search's measured defaults, shared with `cqil build`

    fast = DEFAULTS["plan"]
    group = parser.add_argument_group("automatic plan (--auto; see docs/autoplan.md)")
    group.add_argument("--auto", action="store_true", help="search the plan on calibration text")
    group.add_argument("--target-depth", type=int, metavar="N", help="number of groups wanted")
    group.add_argument("--max-kl", type=float, metavar="X", help="budget on held-out KL(original || plan), nats/token")
    group.add_argument("--max-group-size", type=int, default=2, metavar="P", help="largest group (default %(default)s)")
    group.add_argument("--bypass-choices", default=fast["bypass_choices"], metavar="D,...",
                       help="bypass distances to try (default %(default)s)")
    group.add_argument("--proxy-keep", type=float, default=1.0, metavar="F",
                       help="measure only this fraction of each size's candidates, those whose layer inputs "
                            "are most alike (default %(default)s: all)")
    group.add_argument("--head-every", type=int, default=fast["head_every"], metavar="K",
                       help="score the KL at every K-th position only (default %(default)s; 1 = all)")
    group.add_argument("--eval-chunks", type=int, default=None, metavar="N",
                       help="held-out chunks for verification (default: all)")
    add_data_options(parser)
    parser.set_defaults(max_chunks=fast["calibration_chunks"])  # calibration chunks for scoring


def auto_requested(args: argparse.Namespace) -> bool:
    """True for --auto; refuses the search options without it rather than ignoring them."""
    if not args.auto and (args.target_depth is not None or args.max_kl is not None):
        raise CqilError("--target-depth and --max-kl choose an automatic plan: add --auto")
    return args.auto


def cmd_auto_plan(args: argparse.Namespace) -> None:
    from pipeline.autoplan import SearchRequest, parse_bypass_choices, search
    from pipeline.model.cqil import CqilModel
    from pipeline.data import load_split
    from pipeline.model.fsutil import atomic_write_text
    from pipeline.model.plan import identity_plan, model_record
    from pipeline.sources import load_model

    clashing = [name for name in ("plan", "uniform", "groups", "official") if getattr(args, name, None)]
    if clashing:
        raise CqilError(f"--auto searches the plan itself: drop --{clashing[0]}")
    if args.bypass is not None:
        raise CqilError("--auto tries the distances in --bypass-choices: drop --bypass")
    loaded = load_model(args.model)
    config = loaded.model.config
    request = SearchRequest(args.target_depth, args.max_kl, args.max_group_size,
                            parse_bypass_choices(args.bypass_choices), args.proxy_keep, args.head_every)
    request.check(config.num_hidden_layers)
    split = load_split(loaded.tokenizer, args.data, args.eval_data, args.seq_len)
    calibration = limit_chunks(split.train, args.max_chunks)
    held_out = limit_chunks(split.held_out, args.eval_chunks)
    original = CqilModel(loaded.model, identity_plan(config.num_hidden_layers))
    result = search(original, calibration, held_out, request, model_record(config), args.batch_size)
    report = {"model": loaded.name, "data": split.source, **result.report}
    table = args.out.with_suffix(".search.json")
    atomic_write_text(table, json.dumps(report, indent=2) + "\n")
    result.plan.save(args.out)

    measured = report["measured"]
    print(f"{loaded.name}: {len(report['candidates'])} candidate groups scored on {len(calibration)} "
          f"calibration chunks, verified on {len(held_out)} held-out chunks")
    for step in report["steps"]:
        spans = ",".join(f"{g[0]}-{g[-1]}" for g in step["groups"]) or "none"
        print(f"  depth {step['depth']:>3} d={step['bypass']}  predicted KL {step['predicted_kl']:.4f}  "
              f"measured KL {step['measured']['kl']:.4f}  ppl {step['measured']['ppl']:.3f}  groups {spans}")
    print(f"{args.out}: {result.plan.describe()}; held-out KL {measured['kl']:.4f}, "
          f"ppl {measured['ppl']:.3f} (original {measured['original_ppl']:.3f}); scoring {result.seconds['score']:.0f} s, "
          f"verification {result.seconds['verify']:.0f} s")
    print(f"candidate table: {table}")
