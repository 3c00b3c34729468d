"""`cqil build`: the staged build-once pipeline (source -> ... -> package, report.md)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cqil.export.choices import LAYOUTS, PRECISIONS
from cqil.model.fsutil import atomic_write_text
from cqil.pipeline.build_config import STAGE_ORDER, load_config, to_toml
from cqil.pipeline.commands.options import NON_NEGATIVE, TEXT, input_file, output_dir
from cqil.pipeline.manifest import write_manifest
from cqil.pipeline.report import render
from cqil.pipeline.stages import is_build_dir, run_stages


def _build_dir():
    return output_dir(is_ours=is_build_dir)


def cmd_build(args: argparse.Namespace) -> int:
    overrides = list(args.set or [])
    shortcuts = {"model": "source.model", "uniform": "plan.uniform", "bypass": "plan.bypass",
                 "steps": "recover.steps", "layout": "export.layout",
                 "precision": "export.precision"}
    for option, key in shortcuts.items():
        value = getattr(args, option)
        if value is not None:
            overrides.append(f"{key}={value}" if not isinstance(value, str) else f'{key}="{value}"')
    results, seconds = run(load_config(args.config, overrides), args.out, args.force or (), args.until)
    ran = sum(r.status == "ran" for r in results)
    print(f"{args.out}: {ran} stage(s) ran, {len(results) - ran} up to date, {seconds:.0f} s; "
          f"report: {args.out / 'report.md'}")
    validation = next((r for r in results if r.name == "validate"), None)
    if validation and validation.record["metrics"].get("passed") is False:
        print(f"validation FAILED: see {args.out / 'validate' / 'validation.json'}", file=sys.stderr)
        return 1
    return 0


def run(config: dict, out: Path, force: tuple[str, ...] = (), until: str | None = None) -> tuple[list, float]:
    """The stages of the resolved `config` run into the build directory `out` (those in `force` again, none
    after `until`), then build.toml, report.md and manifest.json written: the stage results and the seconds."""
    from cqil.pipeline.build import make_stages  # the stages' modules load torch: not at `cqil --help`

    start = time.perf_counter()
    stages = make_stages(config)
    assert [s.name for s in stages] == list(STAGE_ORDER)
    results = run_stages(stages, out, force=force, until=until, log=lambda message: print(message, file=sys.stderr))
    seconds = time.perf_counter() - start
    atomic_write_text(out / "build.toml", to_toml(config))
    atomic_write_text(out / "report.md", render(out, results, seconds))
    write_manifest(out, results)  # last: it records the files above
    return results, seconds


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="the staged build-once pipeline: source -> ... -> package (report.md)")
    p.add_argument("--config", type=input_file(), help="build.toml: [section] key = value for any stage parameter")
    p.add_argument("--out", type=_build_dir(), default="artifacts",
                   help="build directory (default %(default)s; an earlier build there is updated)")
    p.add_argument("--set", type=TEXT, action="append", metavar="SECTION.KEY=VALUE",
                   help="override one parameter (repeatable)")
    p.add_argument("--model", type=TEXT, help="shortcut for --set source.model=...")
    p.add_argument("--uniform", type=TEXT, metavar="S:E:P", help="shortcut for --set plan.uniform=...")
    p.add_argument("--bypass", type=NON_NEGATIVE, help="shortcut for --set plan.bypass=...")
    p.add_argument("--steps", type=NON_NEGATIVE, help="shortcut for --set recover.steps=... (0 = no recovery)")
    p.add_argument("--layout", choices=LAYOUTS, help="shortcut for --set export.layout=...")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="shortcut for --set export.precision=...")
    p.add_argument("--force", action="append", choices=STAGE_ORDER, metavar="STAGE", help="rerun this stage (repeatable)")
    p.add_argument("--until", choices=STAGE_ORDER, metavar="STAGE", help="stop after this stage")
    p.set_defaults(func=cmd_build)
