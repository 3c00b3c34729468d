"""`cqil verify`: recheck a build's files against the sha256 its stages recorded (exit 1 on a difference)."""

from __future__ import annotations

import argparse

from cqil.pipeline.commands.options import INPUT_FOLDER


def cmd_verify(args: argparse.Namespace) -> int:
    from cqil.model.errors import CqilError
    from cqil.pipeline.stages import verify_build

    if not (args.dir / "manifest.json").is_file():
        raise CqilError(f"'{args.dir}' is not a cqil build (no manifest.json): pass the --out of `cqil build`")
    problems = verify_build(args.dir)
    for problem in problems:
        print(problem)
    print(f"{args.dir}: {'OK, every file matches its recorded sha256' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="recheck a build's files against the sha256 its stages recorded")
    p.add_argument("dir", type=INPUT_FOLDER, help="the build directory")
    p.set_defaults(func=cmd_verify)
