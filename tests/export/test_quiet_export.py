"""export/onnx_export.py drops torch.onnx's "torchvision is not installed" notes, and only those.

torch prints them through its own log handler (stderr) while it builds the exporter's op registry;
the CLI's level on `torch.onnx` does not hold, since torch resets its loggers' levels when its
logging initializes, so the levels are reset here too before each check. The records are read with
caplog (they propagate to the root logger); a filtered record is never created.
"""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch
from cqil.export import onnx_export
from cqil.export.onnx_export import REGISTRY_LOGGER, no_torchvision_notes

NOTE = "torchvision is not installed"


@pytest.fixture
def torch_onnx_levels():
    """torch.onnx's loggers at their default level (as after torch's logging init), restored after."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", REGISTRY_LOGGER)]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.NOTSET)
    yield
    for logger, level in zip(loggers, levels):
        logger.setLevel(level)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision installed: no notes")
def test_registry_notes_are_dropped_and_other_records_pass(torch_onnx_levels, caplog):
    from torch.onnx._internal.exporter._registration import ONNXRegistry

    ONNXRegistry.from_torchlib()
    assert NOTE in caplog.text  # what the demo printed
    caplog.clear()
    with no_torchvision_notes():
        ONNXRegistry.from_torchlib()
        logging.getLogger(REGISTRY_LOGGER).warning("a real exporter warning")
    assert NOTE not in caplog.text and "a real exporter warning" in caplog.text
    caplog.clear()
    logging.getLogger(REGISTRY_LOGGER).warning(f"{NOTE}. Skipping torchvision::nms")  # the filter is gone after
    assert NOTE in caplog.text


def test_export_layout_runs_the_exporter_under_the_filter(torch_onnx_levels, caplog, monkeypatch):
    """The exporter is replaced by one that logs a note and a real warning, then stops the export."""
    from cqil.model.cqil import CqilModel
    from cqil.model.plan import identity_plan

    from tests.helpers import tiny_model

    def exporter(*args, **kwargs):
        logger = logging.getLogger(REGISTRY_LOGGER)
        logger.warning("%s. Skipping %s", NOTE, "torchvision::roi_align")
        logger.warning("an unsupported op")
        raise RuntimeError("stop after logging")

    monkeypatch.setattr(torch.onnx, "export", exporter)
    model = CqilModel(tiny_model("llama", 2), identity_plan(2))
    with pytest.raises(RuntimeError, match="stop after logging"):
        onnx_export.export_layout(model, model, torch.float32)
    assert NOTE not in caplog.text and "an unsupported op" in caplog.text
