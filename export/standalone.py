"""The ONNX contract in files that run where cqil is not installed: a Triton model, a GPU host's scripts.

Such a file names the contract's inputs and outputs and computes position ids; rather than keep its own
copy, it says `from cqil.export.contract import ...` (so it runs in the repository and in the tests as
it is), and cqil writes it with that line replaced by the definitions themselves — constants as
literals, functions as their source — taken from export/contract.py at write time.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from types import CodeType

from cqil.export import contract
from cqil.model.errors import CqilError

IMPORT = re.compile(r"^from cqil\.export\.contract import ([\w, ]+)$", re.MULTILINE)


def contract_source(names: Sequence[str]) -> str:
    """Python source that defines `names` as export/contract.py does, and the contract names they use
    (first); its functions need numpy imported as np."""
    ordered: list[str] = []

    def visit(name: str) -> None:
        if name in ordered:
            return
        value = getattr(contract, name)
        if inspect.isfunction(value):
            for used in sorted(_names_used(value.__code__)):
                if _contract_definition(used):
                    visit(used)
        ordered.append(name)

    for name in names:
        visit(name)
    return "\n\n\n".join(_definition(name) for name in ordered)


def _definition(name: str) -> str:
    value = getattr(contract, name)
    return inspect.getsource(value).rstrip() if inspect.isfunction(value) else f"{name} = {value!r}"


def _names_used(code: CodeType) -> set[str]:
    """Global names a function's code reads, its comprehensions' included."""
    nested = (_names_used(const) for const in code.co_consts if isinstance(const, CodeType))
    return set(code.co_names).union(*nested)


def _contract_definition(name: str) -> bool:
    """A function or an upper-case constant that export/contract.py itself defines (not an import)."""
    value = getattr(contract, name, None)
    if inspect.isfunction(value):
        return value.__module__ == contract.__name__
    return name.isupper() and isinstance(value, (str, int, tuple))


def inline_contract(source: str) -> str:
    """`source` with its one `from cqil.export.contract import ...` line replaced by the definitions."""
    found = IMPORT.findall(source)
    if len(found) != 1:
        raise CqilError(f"expected one 'from cqil.export.contract import ...' line, found {len(found)}")
    names = [name.strip() for name in found[0].split(",")]
    block = f"# The ONNX contract's names, written from cqil's export/contract.py.\n{contract_source(names)}"
    return IMPORT.sub(lambda _match: block, source)
