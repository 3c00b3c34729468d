"""One real tiny `cqil build`, shared by the modules that read it (tests that change it work on a copy)."""

from __future__ import annotations

import pytest

from tests.helpers import build_args


@pytest.fixture(scope="session")
def built(tiny_model_dir, tmp_path_factory):
    """(model dir, build dir) of one tiny build; read it, or copy it before changing anything."""
    from cqil.pipeline.cli import main

    model = tiny_model_dir("llama")
    out = tmp_path_factory.mktemp("build") / "artifacts"
    assert main(build_args(model, out)) == 0
    return model, out
