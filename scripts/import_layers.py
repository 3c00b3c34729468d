"""Check that imports run one way at folder level: model -> export -> engines -> pipeline (DESIGN.md section 3).

    python scripts/import_layers.py        prints each folder's imports of the others; exit 1 on an arrow up

Reads every module of the package with `ast` (imports inside functions included), so it needs nothing
installed. The package root `cqil/` (its `__main__` runs the CLI) sits on top of all of them.
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("model", "export", "engines", "pipeline", "cqil")  # lowest first; each may import only those before it


def folder_of(module: str) -> str | None:
    """The top folder a `cqil...` module lives in (`cqil.export.contract` -> `export`; `cqil` -> `cqil`)."""
    parts = module.split(".")
    if parts[0] != "cqil":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "cqil"


def imported_modules(path: Path) -> list[str]:
    """Every absolute module name `path` imports, with `from cqil import x` read as `cqil.x`."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def arrows(root: Path = ROOT) -> Counter[tuple[str, str]]:
    """(from folder, to folder) -> number of import statements, over every module of the package."""
    counts: Counter[tuple[str, str]] = Counter()
    for folder in LAYERS:
        for path in sorted((root / folder).rglob("*.py")):
            for module in imported_modules(path):
                target = folder_of(module)
                if target is not None and target != folder:
                    counts[(folder, target)] += 1
    return counts


def upward(counts: Counter[tuple[str, str]]) -> list[tuple[str, str]]:
    """The arrows that run from a lower folder to a higher one."""
    return [(src, dst) for src, dst in counts if LAYERS.index(dst) > LAYERS.index(src)]


def main() -> int:
    counts = arrows()
    for (src, dst), n in sorted(counts.items(), key=lambda item: (LAYERS.index(item[0][0]), item[0][1])):
        print(f"{src:>8} -> {dst:<8} {n:4d} imports")
    bad = upward(counts)
    for src, dst in bad:
        print(f"arrow up: {src}/ imports {dst}/ ({counts[(src, dst)]} imports); order is {' -> '.join(LAYERS)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
