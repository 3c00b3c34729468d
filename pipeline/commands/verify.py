"""`cqil verify`: recheck a build directory against its manifest.json (exit 1 on any mismatch, 2 on a bad manifest)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cqil.pipeline.commands.options import INPUT_FOLDER
from cqil.pipeline.manifest import NAME, Problem, verify


def cmd_verify(args: argparse.Namespace) -> int:
    result = run(args.dir)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for problem in result["problems"]:
            print(Problem(problem["path"], problem["problem"], problem["detail"]).line())
        count = len(result["problems"])
        print(f"{args.dir}: " + (f"OK, all {result['files_checked']} files recorded in {NAME} match their sha256 and "
                                 f"size" if not count else f"{count} mismatch(es) with {NAME}"))
    return 0 if result["ok"] else 1


def run(build_dir: Path) -> dict:
    """Every file of the build at `build_dir` against its manifest: `cqil verify --json`'s record."""
    problems, checked = verify(build_dir)
    return {"build": str(build_dir), "ok": not problems, "files_checked": checked,
            "problems": [{"path": p.path, "problem": p.kind, "detail": p.detail} for p in problems]}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="recheck a build directory against its manifest.json (sha256 and size of every file)")
    p.add_argument("dir", type=INPUT_FOLDER, help="the build directory (the --out of cqil build)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (for CI)")
    p.set_defaults(func=cmd_verify)
