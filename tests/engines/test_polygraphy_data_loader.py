"""data_loader.py, the feeds of check_engine.sh, on the tiny export: ONNX Runtime runs them and gives
what the PyTorch CqilModel gives on the same tensors (so the mask, positions and cache are the
contract's), and `polygraphy run --onnxrt` loads the script and runs both functions on CPU."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from cqil.engines.tensorrt import script as trt_script
from cqil.engines.tensorrt import settings as trt_settings
from cqil.export.contract import output_names, past_names
from cqil.model.cqil import CqilModel
from cqil.model.plan import Plan

OPTIONS = trt_settings.EngineOptions(opt_batch=2, max_batch=2, opt_seq=7, max_seq=16, opt_past=5, max_context=32)
TOL = 1e-4


@pytest.fixture(scope="module")
def check_dir(tiny_cqil_onnx, tmp_path_factory):
    """The tiny export copied with check_engine.sh and data_loader.py written beside it."""
    folder = tmp_path_factory.mktemp("check")
    for path in tiny_cqil_onnx[1].iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    settings = trt_settings.engine_settings(folder, folder / "model.plan", OPTIONS)
    trt_script.write_engine_files(settings, folder)
    return folder


@pytest.fixture(scope="module")
def reference(tiny_cqil_onnx):
    from transformers import AutoModelForCausalLM

    return CqilModel(AutoModelForCausalLM.from_pretrained(tiny_cqil_onnx[0]).eval(), Plan(((0,), (1, 2, 3)), 1))


def feeds(check_dir: Path, name: str) -> list[dict[str, np.ndarray]]:
    return list(runpy.run_path(str(check_dir / "data_loader.py"))[name]())


@torch.no_grad()
@pytest.mark.parametrize("loader, past", [("load_prefill", 0), ("load_decode", 5)])
def test_feeds_run_on_onnxruntime_as_on_pytorch(check_dir, reference, loader, past):
    (feed,) = feeds(check_dir, loader)
    seq = 7 if past == 0 else 1
    assert feed["input_ids"].shape == (2, seq) and feed["attention_mask"].shape == (2, past + seq)
    assert feed["attention_mask"][1, 0] == 0 and feed["attention_mask"][0].all()  # row 1 left-padded
    assert all(feed[name].shape == (2, 2, past, 16) and feed[name].dtype == np.float32 for name in past_names(4))
    session = ort.InferenceSession(str(check_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    logits, *presents = session.run(output_names(4), feed)
    cache = [torch.from_numpy(feed[name]) for name in past_names(4)]
    # the reference derives positions from the mask: the feed's own position_ids must agree
    ref_logits, ref_presents = reference(torch.from_numpy(feed["input_ids"]), torch.from_numpy(feed["attention_mask"]),
                                         past_key_values=cache if past else None)
    assert np.abs(logits - ref_logits.numpy()).max() < TOL
    assert max(np.abs(a - b.numpy()).max() for a, b in zip(presents, ref_presents)) < TOL
    if past:  # the decode cache is carried into the presents
        assert np.array_equal(presents[0][:, :, :past], feed["past_key_values.0.key"])


def test_polygraphy_run_loads_the_script(check_dir):
    polygraphy = Path(sys.executable).with_name("polygraphy")
    for loader in ("load_prefill", "load_decode"):
        result = subprocess.run([str(polygraphy), "run", "model.onnx", "--onnxrt",
                                 "--data-loader-script", f"data_loader.py:{loader}"],
                                cwd=check_dir, capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert "PASSED" in result.stdout + result.stderr
