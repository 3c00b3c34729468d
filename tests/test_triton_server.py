"""A real Triton server serves the repository's Python-backend model; its logits match PyTorch.

The `tritonserver` binary, its libraries and the Python-backend stubs come from the nvidia-pytriton
wheel (docs/triton.md says how it is installed); they run on CPU. The test exports a tiny CQIL model
(a parallel group with bypass), writes the repository with `cqil triton`, starts the server on free
ports, and sends a prefill request (empty past, left padding) and a decode request built from its
presents over gRPC. It fails, never skips, when the server cannot be found, started or reached.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from export.contract import input_names, output_names
from pipeline.cli import main
from pipeline.model.cqil import CqilModel
from pipeline.model.plan import Plan
from tests.conftest import tiny_model
from tests.contract_onnx import export_cqil_model

pytestmark = pytest.mark.slow

MODEL = "cqil_python"
LAYERS = 4
PLAN = Plan(((0,), (1, 2), (3,)), bypass=1)
READY_TIMEOUT_S = 180
TOLERANCE = 1e-4


def pytriton_server() -> tuple[Path, Path]:
    """The tritonserver folder and the bundled libraries folder inside the installed nvidia-pytriton."""
    spec = importlib.util.find_spec("pytriton")  # finds the package without importing its Python API
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("nvidia-pytriton is not installed: `pip install --no-deps nvidia-pytriton` (docs/triton.md)")
    root = Path(spec.submodule_search_locations[0])
    server, libs = root / "tritonserver", root.parent / "nvidia_pytriton.libs"
    if not (server / "bin" / "tritonserver").is_file() or not libs.is_dir():
        pytest.fail(f"no tritonserver binary under {server} (or no {libs}): reinstall nvidia-pytriton")
    return server, libs


def python_backend_dir(server: Path, root: Path) -> Path:
    """A backend directory whose python/ holds the backend and the stub built for this interpreter."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        pytest.fail(f"nvidia-pytriton has no Python-backend stub for Python {version} ({stub})")
    backend = root / "backends" / "python"
    backend.mkdir(parents=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        (backend / name).symlink_to(server / "backends" / "python" / name)
    (backend / "triton_python_backend_stub").symlink_to(stub)
    return backend.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def triton_server(repo: Path, work: Path):
    """Start tritonserver with only MODEL loaded; yield a gRPC client and the log file; stop it afterwards."""
    import tritonclient.grpc as grpcclient

    server, libs = pytriton_server()
    backends = python_backend_dir(server, work)
    port = free_port()
    env = dict(os.environ)
    # The stub embeds libpython: prefer this interpreter's own, and put this venv's python first on PATH
    # so the embedded interpreter finds the venv's site-packages (numpy, onnxruntime), as pytriton does.
    env["LD_LIBRARY_PATH"] = ":".join(filter(None, (sysconfig.get_config_var("LIBDIR"), str(libs),
                                                   env.get("LD_LIBRARY_PATH"))))
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    command = [str(server / "bin" / "tritonserver"), "--model-repository", str(repo),
               "--model-control-mode", "explicit", "--load-model", MODEL,
               "--backend-directory", str(backends), "--grpc-port", str(port),
               "--allow-http", "false", "--allow-metrics", "false"]
    log_path = work / "tritonserver.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")

    def log_tail() -> str:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])

    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"tritonserver exited with status {process.returncode}:\n{log_tail()}")
            with contextlib.suppress(Exception):
                if client.is_model_ready(MODEL):
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"{MODEL} not ready after {READY_TIMEOUT_S} s:\n{log_tail()}")
            time.sleep(0.5)
        yield client, log_path
    finally:
        client.close()
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def infer(client, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import tritonclient.grpc as grpcclient

    dtypes = {np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32"}
    inputs = []
    for name, array in feed.items():
        tensor = grpcclient.InferInput(name, list(array.shape), dtypes[array.dtype])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    outputs = [grpcclient.InferRequestedOutput(name) for name in output_names(LAYERS)]
    result = client.infer(MODEL, inputs, outputs=outputs)
    return {name: result.as_numpy(name) for name in output_names(LAYERS)}


def contract_feed(ids, mask, positions, past) -> dict[str, np.ndarray]:
    return dict(zip(input_names(LAYERS), [t.numpy() for t in (ids, mask, positions, *past)]))


def test_triton_serves_the_python_backend_model(tmp_path, capsys):
    model = CqilModel(tiny_model("llama", layers=LAYERS), PLAN).eval()
    export_cqil_model(model, tmp_path / "onnx" / "model.onnx")
    assert main(["triton", "--onnx", str(tmp_path / "onnx"), "--out", str(tmp_path / "repo")]) == 0
    capsys.readouterr()

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.hf.config.vocab_size, (2, 5), generator=generator)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    empty = torch.zeros(2, model.num_kv_heads, 0, model.head_dim)
    with torch.no_grad():
        logits, presents = model(ids, mask, positions, [empty] * (2 * LAYERS))
        token = logits[:, -1].argmax(-1, keepdim=True)
        step_mask = torch.cat((mask, torch.ones(2, 1, dtype=torch.long)), 1)
        step_positions = positions[:, -1:] + 1
        step_logits, step_presents = model(token, step_mask, step_positions, list(presents))

    with triton_server(tmp_path / "repo", tmp_path) as (client, log_path):
        prefill = infer(client, contract_feed(ids, mask, positions, [empty] * (2 * LAYERS)))
        decode = infer(client, contract_feed(token, step_mask, step_positions, presents))
        log = log_path.read_text(errors="replace")
    assert "Traceback" not in log, log  # the model ran cleanly, no Python errors in the server log

    for got, want_logits, want_presents in ((prefill, logits, presents), (decode, step_logits, step_presents)):
        assert got["logits"].shape == tuple(want_logits.shape)
        np.testing.assert_allclose(got["logits"], want_logits.numpy(), atol=TOLERANCE, rtol=0)
        for name, want in zip(output_names(LAYERS)[1:], want_presents):
            np.testing.assert_allclose(got[name], want.numpy(), atol=TOLERANCE, rtol=0)
    assert decode["present.3.value"].shape[2] == 6  # 5 prompt tokens + 1 decoded
