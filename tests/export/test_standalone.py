"""export/standalone.py: files that run without cqil carry the contract's own definitions, written at write time."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from cqil.engines.triton import TEXT_MODEL_SOURCE
from cqil.export import contract
from cqil.export.standalone import contract_source, inline_contract
from cqil.model.decoder import positions_from_mask
from cqil.model.errors import CqilError


def _run(source: str) -> dict:
    namespace = {"np": np}
    exec(compile(source, "<standalone>", "exec"), namespace)  # noqa: S102 - our own generated source
    return namespace


def test_contract_source_defines_the_names_and_what_they_use():
    names = _run(contract_source(["output_names", "past_names", "TOKEN_INPUTS"]))
    assert names["output_names"](3) == contract.output_names(3)  # needs LOGITS and present_names: pulled in
    assert names["past_names"](2) == contract.past_names(2) and names["TOKEN_INPUTS"] == contract.TOKEN_INPUTS
    assert "LOGITS" in names and "present_pair" in names and "read_contract" not in names


def test_mask_positions_is_the_models_rule_in_numpy():
    rng = np.random.default_rng(0)
    mask = np.ones((3, 9), dtype=np.int64)
    mask[1, :4] = 0
    mask[2, :rng.integers(1, 8)] = 0
    positions = _run(contract_source(["mask_positions"]))["mask_positions"]
    for seq in (1, 5, 9):
        want = positions_from_mask(torch.from_numpy(mask), seq).numpy()
        assert np.array_equal(positions(mask, seq), want) and np.array_equal(contract.mask_positions(mask, seq), want)


def test_inline_contract_replaces_the_import_line_of_the_triton_text_model():
    source = TEXT_MODEL_SOURCE.read_text()
    assert "from cqil.export.contract import" in source and '"past_key_values.' not in source
    written = inline_contract(source)
    compile(written, "model.py", "exec")
    assert not re.search(r"^\s*(from|import) cqil", written, re.MULTILINE)  # runs where cqil is not installed
    assert 'return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"' in written
    with pytest.raises(CqilError, match="found 0"):
        inline_contract("import numpy as np\n")
