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
import json
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from cqil.engines.triton_server import run_server, stub_python_bin
from cqil.export.contract import input_names, output_names
from cqil.model.cqil import CqilModel
from cqil.model.errors import CqilError
from cqil.model.plan import Plan
from cqil.pipeline.cli import main

from tests.contract_onnx import export_cqil_model
from tests.helpers import tiny_model

pytestmark = pytest.mark.slow

MODEL = "cqil_python"
LAYERS = 4
PLAN = Plan(((0,), (1, 2), (3,)), bypass=1)
TOLERANCE = 1e-4


@contextlib.contextmanager
def triton_server(repo: Path, work: Path, model: str = MODEL, python_bin: Path | None = None, metrics: bool = False):
    """The server of engines/triton_server.py with a gRPC client; any failure to start fails the test."""
    import tritonclient.grpc as grpcclient

    try:
        with run_server(repo, work, model, python_bin, metrics) as server:
            client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
            try:
                yield Served(client, server.http_port, server.metrics_port, server.log)
            finally:
                client.close()
    except CqilError as exc:
        pytest.fail(str(exc))


@dataclass
class Served:
    client: object  # tritonclient.grpc.InferenceServerClient
    http_port: int
    metrics_port: int | None
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
    try:
        return stub_python_bin()
    except CqilError as exc:
        pytest.fail(str(exc))


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

    with triton_server(tmp_path / "repo", tmp_path, TEXT_MODEL, numpy1_python_bin(), metrics=True) as server:
        port = server.http_port
        single, _, _ = generate(port, TEXT_PROMPTS[0])
        status, stream = post(port, f"/v2/models/{TEXT_MODEL}/generate_stream",
                              {"text_input": TEXT_PROMPTS[1], "max_tokens": TEXT_TOKENS, "stream": True,
                               "return_finish_reason": True, "return_num_output_tokens": True})
        with ThreadPoolExecutor(4) as pool:  # four requests at once
            together = list(pool.map(lambda prompt: generate(port, prompt), TEXT_PROMPTS))
        fields_status, fields_body = post(port, f"/v2/models/{TEXT_MODEL}/generate", {
            "text_input": TEXT_PROMPTS[2], "exclude_input_in_output": False,
            "sampling_parameters": json.dumps({"max_tokens": TEXT_TOKENS, "temperature": 0})})
        bad_status, bad_body = post(port, f"/v2/models/{TEXT_MODEL}/generate", {"max_tokens": 4})
        field_status, field_body = post(port, f"/v2/models/{TEXT_MODEL}/generate",
                                        {"text_input": "x", "sampling_parameters": "{\"beam_width\": 2}"})
        after_status, _ = post(port, f"/v2/models/{TEXT_MODEL}/generate", {"text_input": "x", "max_tokens": 2})
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=30) as response:
            metrics = response.read().decode()
        log = server.log.read_text(errors="replace")

    assert single.strip() == expected[TEXT_PROMPTS[0]]
    assert status == 200, stream
    events = [json.loads(line[len("data: "):]) for line in stream.splitlines() if line.startswith("data: ")]
    assert len(events) > 1 and "".join(e["text_output"] for e in events).strip() == expected[TEXT_PROMPTS[1]]
    assert events[-1]["finish_reason"] in ("stop", "length") and all(e["finish_reason"] == "" for e in events[:-1])
    assert 0 < sum(e["num_output_tokens"] for e in events) <= TEXT_TOKENS
    for prompt, (text, _, _) in zip(TEXT_PROMPTS, together):
        assert text.strip() == expected[prompt]
    assert fields_status == 200, fields_body
    echoed = json.loads(fields_body)["text_output"]  # the prompt, then the greedy continuation
    assert echoed.startswith(TEXT_PROMPTS[2]) and echoed[len(TEXT_PROMPTS[2]):].strip() == expected[TEXT_PROMPTS[2]]
    assert bad_status == 400 and "no text_input" in bad_body
    assert field_status == 400 and "unknown keys beam_width" in field_body and after_status == 200
    # Triton's own metrics stay on, beside the model's custom ones; some step ran more than one row.
    assert "nv_inference_request_success" in metrics
    for name in ("cqil_text_generated_tokens_total", "cqil_text_queue_length", "cqil_text_rejected_requests_total",
                 "cqil_text_time_to_first_token_seconds_count"):
        assert name in metrics, name
    rows = {line.split('le="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines() if line.startswith("cqil_text_step_rows_bucket")}
    assert rows["+Inf"] > rows["1"], rows  # batched: steps with more than one active row
    assert "Traceback" not in log, log


def test_quick_load_test_with_aiperf(tmp_path, tiny_model_dir):
    """scripts/load_test.sh --quick: AIPerf against a real server at two concurrencies, no failed request."""
    model_dir = tiny_model_dir("llama", LAYERS)
    assert main(["export", "--model", str(model_dir), "--groups", "1-2", "--bypass", "1",
                 "--out", str(tmp_path / "onnx")]) == 0
    script = Path(__file__).resolve().parents[2] / "scripts" / "load_test.sh"
    result = subprocess.run([str(script), "--quick", "--onnx", str(tmp_path / "onnx"), "--work", str(tmp_path / "work"),
                             "--out", str(tmp_path / "load.json")], capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = json.loads((tmp_path / "load.json").read_text())["records"]
    assert [r["concurrency"] for r in records] == [1, 4]
    for record in records:
        assert record["requests"] > 0 and record["failed"] == 0, record
        assert record["output_tokens_per_s"] > 0 and 0 < record["ttft_p50_ms"] <= record["ttft_p99_ms"]
        assert 0 < record["itl_p50_ms"] <= record["itl_p99_ms"]
