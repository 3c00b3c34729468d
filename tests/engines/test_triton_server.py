"""A real Triton server serves the repository's Python-backend models: logits match PyTorch, text matches
`cqil generate` through the generate and generate_stream endpoints.

The `tritonserver` binary, its libraries and the Python-backend stubs come from the nvidia-pytriton
wheel (docs/triton.md says how it is installed); they run on CPU. The test exports a tiny CQIL model
(a parallel group with bypass), writes the repository with `cqil triton`, starts the server on free
ports, and sends a prefill request (empty past, left padding) and a decode request built from its
presents over gRPC. It fails, never skips, when the server cannot be found, started or reached.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from cqil.export.contract import input_names, output_names
from cqil.model.cqil import CqilModel
from cqil.model.plan import Plan
from cqil.pipeline.cli import main

from tests.contract_onnx import export_cqil_model
from tests.helpers import tiny_model

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
def triton_server(repo: Path, work: Path, model: str = MODEL, python_bin: Path | None = None):
    """Start tritonserver with only `model` loaded; yield a gRPC client, the HTTP port and the log file.

    `python_bin`: the bin/ of the Python environment the backend's stub runs in (default: this venv's).
    """
    import tritonclient.grpc as grpcclient

    server, libs = pytriton_server()
    backends = python_backend_dir(server, work)
    grpc_port, http_port = free_port(), free_port()
    env = dict(os.environ)
    # The stub embeds libpython: prefer this interpreter's own, and put this venv's python first on PATH
    # so the embedded interpreter finds the venv's site-packages (numpy, onnxruntime), as pytriton does.
    env["LD_LIBRARY_PATH"] = ":".join(filter(None, (sysconfig.get_config_var("LIBDIR"), str(libs),
                                                   env.get("LD_LIBRARY_PATH"))))
    env["PATH"] = f"{python_bin or Path(sys.executable).parent}:{env.get('PATH', '')}"
    command = [str(server / "bin" / "tritonserver"), "--model-repository", str(repo),
               "--model-control-mode", "explicit", "--load-model", model,
               "--backend-directory", str(backends), "--grpc-port", str(grpc_port),
               "--http-port", str(http_port), "--allow-metrics", "false"]
    log_path = work / "tritonserver.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")

    def log_tail() -> str:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])

    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"tritonserver exited with status {process.returncode}:\n{log_tail()}")
            with contextlib.suppress(Exception):
                if client.is_model_ready(model):
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"{model} not ready after {READY_TIMEOUT_S} s:\n{log_tail()}")
            time.sleep(0.5)
        yield Server(client, http_port, log_path)
    finally:
        client.close()
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Server:
    client: object  # tritonclient.grpc.InferenceServerClient
    http_port: int
    log: Path


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

    with triton_server(tmp_path / "repo", tmp_path) as server:
        prefill = infer(server.client, contract_feed(ids, mask, positions, [empty] * (2 * LAYERS)))
        decode = infer(server.client, contract_feed(token, step_mask, step_positions, presents))
        log = server.log.read_text(errors="replace")
    assert "Traceback" not in log, log  # the model ran cleanly, no Python errors in the server log

    for got, want_logits, want_presents in ((prefill, logits, presents), (decode, step_logits, step_presents)):
        assert got["logits"].shape == tuple(want_logits.shape)
        np.testing.assert_allclose(got["logits"], want_logits.numpy(), atol=TOLERANCE, rtol=0)
        for name, want in zip(output_names(LAYERS)[1:], want_presents):
            np.testing.assert_allclose(got[name], want.numpy(), atol=TOLERANCE, rtol=0)
    assert decode["present.3.value"].shape[2] == 6  # 5 prompt tokens + 1 decoded


# -- the text model: Triton's generate extension, over HTTP ---------------------------------------------

TEXT_MODEL = "cqil_text"
TEXT_PROMPTS = ("The object model of Python", "Lambda expressions", "A for statement iterates", "Class definitions")
TEXT_TOKENS = 12


def numpy1_python_bin() -> Path:
    """bin/ of a virtualenv with numpy < 2, for the stub of the nvidia-pytriton 0.7 wheel (built against numpy 1,
    it misreads numpy 2 arrays, and strings cannot avoid its numpy path: docs/triton.md). Made once, with pip,
    with this venv's onnxruntime and transformers."""
    from importlib import metadata

    from cqil.model.fsutil import cache_dir

    venv = cache_dir() / "venvs" / "triton-numpy1"
    if (venv / "bin" / "python").is_file():
        return venv / "bin"
    venv.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{venv.name}.", dir=venv.parent))
    packages = ["numpy<2", *(f"{name}=={metadata.version(name)}" for name in ("onnxruntime", "transformers"))]
    try:
        subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True)
        subprocess.run([str(tmp / "bin" / "python"), "-m", "pip", "install", "-q", *packages], check=True,
                       capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.fail(f"could not make the numpy<2 environment for the Triton stub ({' '.join(packages)}):\n{exc.stderr}")
    tmp.rename(venv)
    return venv / "bin"


def post(port: int, path: str, body: dict) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def generate(port: int, prompt: str) -> tuple[str, float, float]:
    start = time.monotonic()
    status, body = post(port, f"/v2/models/{TEXT_MODEL}/generate", {"text_input": prompt, "max_tokens": TEXT_TOKENS})
    assert status == 200, body
    return json.loads(body)["text_output"], start, time.monotonic()


def test_triton_generate_endpoints_answer_what_cqil_generate_prints(tmp_path, tiny_model_dir, capsys):
    model_dir = tiny_model_dir("llama", LAYERS)
    plan_args = ["--groups", "1-2", "--bypass", "1"]  # [0] [1,2] [3], d=1: the PLAN above
    assert main(["export", "--model", str(model_dir), *plan_args, "--out", str(tmp_path / "onnx")]) == 0
    assert main(["triton", "--onnx", str(tmp_path / "onnx"), "--out", str(tmp_path / "repo")]) == 0
    assert f"/v2/models/{TEXT_MODEL}/generate" in capsys.readouterr().out
    expected = {}
    for prompt in TEXT_PROMPTS:
        assert main(["generate", "--model", str(model_dir), *plan_args, "--raw", "--prompt", prompt,
                     "--max-new-tokens", str(TEXT_TOKENS)]) == 0
        expected[prompt] = capsys.readouterr().out.strip()
    assert len(set(expected.values())) > 1

    with triton_server(tmp_path / "repo", tmp_path, TEXT_MODEL, numpy1_python_bin()) as server:
        port = server.http_port
        single, _, _ = generate(port, TEXT_PROMPTS[0])
        status, stream = post(port, f"/v2/models/{TEXT_MODEL}/generate_stream",
                              {"text_input": TEXT_PROMPTS[1], "max_tokens": TEXT_TOKENS, "stream": True})
        with ThreadPoolExecutor(4) as pool:  # four requests at once
            together = list(pool.map(lambda prompt: generate(port, prompt), TEXT_PROMPTS))
        bad_status, bad_body = post(port, f"/v2/models/{TEXT_MODEL}/generate", {"max_tokens": 4})
        log = server.log.read_text(errors="replace")

    assert single.strip() == expected[TEXT_PROMPTS[0]]
    assert status == 200, stream
    events = [json.loads(line[len("data: "):]) for line in stream.splitlines() if line.startswith("data: ")]
    assert len(events) > 1 and "".join(e["text_output"] for e in events).strip() == expected[TEXT_PROMPTS[1]]
    for prompt, (text, _, _) in zip(TEXT_PROMPTS, together):
        assert text.strip() == expected[prompt]
    overlap = min(end for _, _, end in together) - max(start for _, start, _ in together)
    print(f"\nfour requests at once: {'all in flight together' if overlap > 0 else 'not all overlapping'} "
          f"(overlap {overlap:.3f} s, longest {max(end - start for _, start, end in together):.3f} s)")
    assert bad_status == 400 and "no text_input" in bad_body
    assert "Traceback" not in log, log
