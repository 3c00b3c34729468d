"""`cqil verify`: recheck a build directory against its manifest.json (exit 1 on any mismatch, 2 on a bad manifest)."""

from __future__ import annotations

import argparse
import json

from cqil.pipeline.commands.options import INPUT_FOLDER


def cmd_verify(args: argparse.Namespace) -> int:
    from cqil.pipeline.manifest import NAME, verify

    problems, checked = verify(args.dir)
    if args.json:
        print(json.dumps({"build": str(args.dir), "ok": not problems, "files_checked": checked,
                          "problems": [{"path": p.path, "problem": p.kind, "detail": p.detail} for p in problems]},
                         indent=2))
    else:
        for problem in problems:
            print(problem.line())
        print(f"{args.dir}: " + (f"OK, all {checked} files recorded in {NAME} match their sha256 and size"
                                 if not problems else f"{len(problems)} mismatch(es) with {NAME}"))
    return 1 if problems else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="recheck a build directory against its manifest.json (sha256 and size of every file)")
    p.add_argument("dir", type=INPUT_FOLDER, help="the build directory (the --out of cqil build)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (for CI)")
    p.set_defaults(func=cmd_verify)
