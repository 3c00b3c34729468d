"""The Triton model repository: configs parsed with Triton's own ModelConfig schema and checked against
the ONNX graph, loadable version folders, the Python-backend model run under a stand-in
`triton_python_backend_utils`, and one-line errors."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import threading
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from cqil.engines.triton import write_model_repository
from cqil.export.contract import PLAN_KEY
from cqil.model.errors import CqilError
from cqil.pipeline.cli import main
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from tests.contract_onnx import TOY_PLAN, toy_feed, write_toy_decoder

ONNX_TYPES = {onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.FLOAT: "TYPE_FP32",
              onnx.TensorProto.FLOAT16: "TYPE_FP16"}


@pytest.fixture
def onnx_dir(tmp_path):
    write_toy_decoder(tmp_path / "onnx" / "decoder.onnx")
    return tmp_path / "onnx"


@pytest.fixture
def engine(tmp_path):
    path = tmp_path / "trt" / "model.plan"
    path.parent.mkdir()
    path.write_bytes(b"not a real engine, but bytes to place")
    return path


def parse_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def run_onnx(path: Path, feed: dict) -> dict[str, np.ndarray]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))


def graph_tensors(values) -> list[tuple[str, str, list[int]]]:
    """Name, Triton dtype and dims (-1 for a symbolic dim), read straight from the ONNX declarations."""
    return [(v.name, ONNX_TYPES[v.type.tensor_type.elem_type],
             [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim])
            for v in values]


def config_tensors(entries) -> list[tuple[str, str, list[int]]]:
    return [(e.name, model_config_pb2.DataType.Name(e.data_type), list(e.dims)) for e in entries]


def test_configs_parse_and_match_the_onnx_graph(onnx_dir, engine, tmp_path):
    repo = tmp_path / "repo"
    result = write_model_repository(onnx_dir, repo, model_name="toy", engine_plan=engine)
    assert sorted(p.name for p in repo.iterdir()) == ["toy_onnx", "toy_python", "toy_trt"]
    assert set(result.models) == {"toy_onnx", "toy_python", "toy_trt"}
    graph = onnx.load(str(onnx_dir / "decoder.onnx"), load_external_data=False).graph
    inputs, outputs = graph_tensors(graph.input), graph_tensors(graph.output)
    assert ("past_key_values.1.value", "TYPE_FP32", [-1, 2, -1, 4]) in inputs  # the check is not vacuous
    assert ("logits", "TYPE_FP32", [-1, -1, 16]) in outputs

    configs = {name: parse_config(repo / name / "config.pbtxt") for name in result.models}
    for name, config in configs.items():
        assert config.name == name
        assert config.max_batch_size == 0
        assert config_tensors(config.input) == inputs
        assert config_tensors(config.output) == outputs
        assert json.loads(config.parameters[PLAN_KEY].string_value) == TOY_PLAN.to_dict()
    assert configs["toy_onnx"].backend == "onnxruntime" and not configs["toy_onnx"].platform
    assert configs["toy_onnx"].default_model_filename == "model.onnx"
    assert configs["toy_trt"].platform == "tensorrt_plan" and not configs["toy_trt"].backend
    [trt_group] = configs["toy_trt"].instance_group
    assert trt_group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU and list(trt_group.profile) == ["0", "1"]
    assert configs["toy_python"].backend == "python"
    [python_group] = configs["toy_python"].instance_group
    assert python_group.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU


def test_no_engine_no_trt_model_and_no_plan_no_parameter(tmp_path):
    write_toy_decoder(tmp_path / "model.onnx", plan=None, external_data=False)
    repo = tmp_path / "repo"
    write_model_repository(tmp_path / "model.onnx", repo)
    assert sorted(p.name for p in repo.iterdir()) == ["cqil_onnx", "cqil_python"]
    assert not parse_config(repo / "cqil_onnx" / "config.pbtxt").parameters


def test_version_folders_hold_loadable_files(onnx_dir, engine, tmp_path):
    repo = tmp_path / "repo"
    write_model_repository(onnx_dir, repo, engine_plan=engine)
    feed = toy_feed()
    expected = run_onnx(onnx_dir / "decoder.onnx", feed)
    shutil.rmtree(onnx_dir)  # the repository must stand on its own
    for name in ("cqil_onnx", "cqil_python"):
        version = repo / name / "1"
        assert (version / "decoder.onnx.data").is_file()  # external data kept at its relative location
        got = run_onnx(version / "model.onnx", feed)
        assert list(got) == list(expected)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])
    assert (repo / "cqil_trt" / "1" / "model.plan").read_bytes() == engine.read_bytes()
    assert (repo / "cqil_python" / "1" / "model.py").is_file()


class FakeTensor:
    def __init__(self, name, array):
        self._name, self._array = name, array

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()

    @classmethod
    def from_dlpack(cls, name, tensor):
        source = tensor if hasattr(tensor, "__dlpack__") else Capsule(tensor)
        return cls(name, np.from_dlpack(source).copy())


class Capsule:
    """Lets numpy consume a bare DLPack capsule, as the backend's C++ does."""

    def __init__(self, capsule):
        self.capsule = capsule

    def __dlpack__(self, **kwargs):
        return self.capsule

    def __dlpack_device__(self):
        return (1, 0)  # kDLCPU, device 0


class FakeResponse:
    def __init__(self, output_tensors, error=None):
        self.output_tensors, self.error = output_tensors, error


def fake_backend_utils() -> types.ModuleType:
    """The parts of triton_python_backend_utils that model.py uses, over plain numpy arrays."""
    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor = FakeTensor
    module.InferenceResponse = FakeResponse
    module.TritonError = lambda message: message
    module.get_input_tensor_by_name = lambda request, name: request.get(name)
    return module


def load_python_model(version: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_backend_utils())
    spec = importlib.util.spec_from_file_location("cqil_triton_model", version / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize({"model_repository": str(version.parent), "model_version": version.name,
                      "model_config": (version.parent / "config.pbtxt").read_text()})
    return model


def test_python_backend_model_matches_onnxruntime(onnx_dir, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    write_model_repository(onnx_dir, repo)
    model = load_python_model(repo / "cqil_python" / "1", monkeypatch)
    prefill, decode = toy_feed(past=0), toy_feed(batch=2, seq=1, past=5, seed=2)
    bad = {k: v for k, v in toy_feed().items() if k != "attention_mask"}
    responses = model.execute([{k: FakeTensor(k, v) for k, v in feed.items()} for feed in (prefill, decode, bad)])
    assert len(responses) == 3
    for feed, response in zip((prefill, decode), responses):
        assert response.error is None
        expected = run_onnx(onnx_dir / "decoder.onnx", feed)
        got = {t.name(): t.as_numpy() for t in response.output_tensors}
        assert list(got) == list(expected)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])
    assert responses[2].output_tensors == [] and responses[2].error  # it fails alone, with a message


def test_cli_writes_the_repository(onnx_dir, engine, tmp_path, capsys):
    code = main(["triton", "--onnx", str(onnx_dir), "--out", str(tmp_path / "repo"), "--engine", str(engine)])
    out = capsys.readouterr().out
    assert code == 0
    assert "2 layers" in out and "cqil_trt: TensorRT engine" in out and "cqil_python" in out
    code = main(["triton", "--onnx", str(onnx_dir), "--out", str(tmp_path / "repo")])  # rerun replaces it
    assert code == 0 and "no --engine" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["cqil_onnx", "cqil_python"]


def assert_one_line_error(capsys, argv, *fragments):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("cqil triton: error:")
    for fragment in fragments:
        assert fragment in err


def test_errors_are_one_line_and_leave_nothing(onnx_dir, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert_one_line_error(capsys, ["triton", "--onnx", str(tmp_path / "nowhere"), "--out", str(repo)],
                          "does not exist")
    assert_one_line_error(capsys, ["triton", "--onnx", str(onnx_dir), "--out", str(repo), "--engine",
                                   str(tmp_path / "missing.plan")], "missing.plan", "cqil engine")
    write_toy_decoder(tmp_path / "partial" / "model.onnx", drop_output="present.1.value")
    assert_one_line_error(capsys, ["triton", "--onnx", str(tmp_path / "partial"), "--out", str(repo)],
                          "lacks outputs present.1.value")
    (tmp_path / "lost").mkdir()
    shutil.copy(onnx_dir / "decoder.onnx", tmp_path / "lost" / "decoder.onnx")  # without its data file
    assert_one_line_error(capsys, ["triton", "--onnx", str(tmp_path / "lost"), "--out", str(repo)],
                          "decoder.onnx.data' is missing")
    assert_one_line_error(capsys, ["triton", "--onnx", str(onnx_dir), "--out", str(repo), "--name", "a/b"],
                          "model name 'a/b'")
    assert not repo.exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    assert_one_line_error(capsys, ["triton", "--onnx", str(onnx_dir), "--out", str(tmp_path / "busy")],
                          "holds other files (notes.txt)")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"


def test_not_the_contract(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(tmp_path / "other.onnx"))
    with pytest.raises(CqilError, match="no 'input_ids' input"):
        write_model_repository(tmp_path / "other.onnx", tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


# -- the text model (generate extension) ----------------------------------------------------------------

TEXT_PROMPTS = ("The object model of Python", "Lambda expressions", "A for statement")


class FakeRequest:
    def __init__(self, inputs: dict, parameters: dict | None = None, cancel_after: int | None = None):
        self.inputs = {name: FakeTensor(name, np.asarray(value)) for name, value in inputs.items()}
        self._parameters, self.sender = parameters or {}, FakeSender(cancel_after)

    def get_response_sender(self):
        return self.sender

    def parameters(self):
        return json.dumps(self._parameters)


class FakeSender:
    """Records what the model sends, and on which thread; `cancel_after` responses, the client goes away."""

    def __init__(self, cancel_after: int | None = None):
        self.sent, self.threads, self.done, self.cancel_after = [], set(), False, cancel_after

    def send(self, response=None, flags=0):
        assert not self.done, "a response after the final flag"
        self.sent.append(response)
        self.threads.add(threading.current_thread().name)
        self.done = bool(flags & FINAL)

    def is_cancelled(self):
        return self.cancel_after is not None and len(self.sent) >= self.cancel_after

    def outputs(self, name: str = "text_output") -> list:
        return [t.as_numpy()[0] for r in self.sent if r is not None and r.error is None
                for t in r.output_tensors if t.name() == name]

    def texts(self) -> list[str]:
        return [value.decode() for value in self.outputs()]

    def errors(self) -> list[str]:
        return [r.error.message for r in self.sent if r is not None and r.error]


FINAL = 1


class ModelException(Exception):
    pass


class FakeError:
    INTERNAL, INVALID_ARG, UNAVAILABLE, CANCELLED = "INTERNAL", "INVALID_ARG", "UNAVAILABLE", "CANCELLED"

    def __init__(self, message, code="INTERNAL"):
        self.message, self.code = message, code


class FakeMetricFamily:
    """pb_utils.MetricFamily over plain numbers: `FakeMetricFamily.values[name]` after the fact."""

    COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
    values: dict = {}

    def __init__(self, name, description, kind):
        self.name, self.kind = name, kind

    def Metric(self, labels=None, buckets=None):  # noqa: N802 -- the backend's name
        family, store = self, FakeMetricFamily.values

        class Metric:
            def increment(self, value):
                store[family.name] = store.get(family.name, 0) + value

            def set(self, value):
                store[family.name] = value

            def observe(self, value):
                store.setdefault(family.name, []).append(value)

        return Metric()


def fake_text_backend_utils(misread: bool = False) -> types.ModuleType:
    module = fake_backend_utils()
    module.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)
    module.TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL
    module.TritonModelException = ModelException
    module.TritonError = FakeError
    FakeMetricFamily.values = {}
    module.MetricFamily = FakeMetricFamily
    module.using_decoupled_model_transaction_policy = lambda config: config["model_transaction_policy"]["decoupled"]

    class Tensor(FakeTensor):
        @classmethod
        def from_dlpack(cls, name, capsule):
            tensor = FakeTensor.from_dlpack(name, capsule)
            if misread:  # what a stub built against another numpy does: every element reads as the first
                tensor._array = np.full_like(tensor._array, tensor._array[0])
            return tensor

    module.Tensor = Tensor
    return module


def load_text_model(version: Path, monkeypatch, misread: bool = False, parameters: dict | None = None):
    from google.protobuf import json_format

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_text_backend_utils(misread))
    spec = importlib.util.spec_from_file_location("cqil_triton_text_model", version / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = parse_config(version.parent / "config.pbtxt")
    for key, value in (parameters or {}).items():
        config.parameters[key].string_value = value
    model = module.TritonPythonModel()
    model.initialize({"model_repository": str(version.parent), "model_version": version.name,
                      "model_config": json_format.MessageToJson(config, preserving_proto_field_name=True)})
    return model, module


@pytest.fixture(scope="module")
def text_repo(tmp_path_factory, tiny_cqil_onnx):
    repo = tmp_path_factory.mktemp("text-repo") / "repo"
    write_model_repository(tiny_cqil_onnx[1], repo)
    return repo


def cqil_generate(model_dir, prompt: str, max_tokens: int, capsys) -> str:
    """What `cqil generate --raw` prints for the tiny CQIL model of the tiny_cqil_onnx fixture."""
    capsys.readouterr()
    assert main(["generate", "--model", str(model_dir), "--groups", "1-3", "--bypass", "1", "--raw",
                 "--prompt", prompt, "--max-new-tokens", str(max_tokens)]) == 0
    return capsys.readouterr().out.strip()


def run_requests(model, requests: list[FakeRequest]) -> list[FakeRequest]:
    assert model.execute(requests) is None  # decoupled: the answers go through the senders
    model.finalize()  # waits for the requests in flight
    return requests


def text_request(prompt: str = TEXT_PROMPTS[0], parameters: dict | None = None, cancel_after: int | None = None,
                 **fields) -> FakeRequest:
    """A request with `fields` as input tensors of the config's types."""
    kinds = {"max_tokens": np.int32, "temperature": np.float32, "top_k": np.int32, "top_p": np.float32,
             "random_seed": np.uint64, "stream": np.bool_, "exclude_input_in_output": np.bool_,
             "return_finish_reason": np.bool_, "return_num_output_tokens": np.bool_}
    inputs = {"text_input": np.array([prompt.encode()], dtype=object)}
    for name, value in fields.items():
        values = value if isinstance(value, list) else [value]
        inputs[name] = np.array([v.encode() if isinstance(v, str) else v for v in values],
                                dtype=kinds.get(name, object))
    return FakeRequest(inputs, parameters, cancel_after)


def test_text_model_config_parses_as_a_decoupled_generate_model(text_repo, onnx_dir, tmp_path):
    assert sorted(p.name for p in text_repo.iterdir()) == ["cqil_onnx", "cqil_python", "cqil_text"]
    config = parse_config(text_repo / "cqil_text" / "config.pbtxt")
    assert config.backend == "python" and config.max_batch_size == 0
    assert config.model_transaction_policy.decoupled
    inputs = {i.name: (model_config_pb2.DataType.Name(i.data_type), list(i.dims), i.optional) for i in config.input}
    assert inputs["text_input"] == ("TYPE_STRING", [1], False)
    assert inputs["max_tokens"] == ("TYPE_INT32", [1], True) and inputs["stream"] == ("TYPE_BOOL", [1], True)
    assert inputs["stop"] == ("TYPE_STRING", [-1], True) and inputs["sampling_parameters"] == ("TYPE_STRING", [1], True)
    assert {"temperature", "top_k", "top_p", "random_seed", "exclude_input_in_output", "return_finish_reason",
            "return_num_output_tokens"} <= set(inputs)
    outputs = {o.name: model_config_pb2.DataType.Name(o.data_type) for o in config.output}
    assert outputs == {"text_output": "TYPE_STRING", "finish_reason": "TYPE_STRING", "num_output_tokens": "TYPE_UINT32"}
    parameters = {key: int(value.string_value) for key, value in config.parameters.items() if key != PLAN_KEY}
    assert parameters["max_batch"] > 1 and parameters["max_queue"] >= parameters["max_batch"]
    assert {"max_tokens_limit", "onnxruntime_threads"} <= set(parameters)
    version = text_repo / "cqil_text" / "1"
    for name in ("model.py", "triton_text_scheduler.py", "model.onnx", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (version / name).is_file(), name
    write_model_repository(onnx_dir, tmp_path / "toy")  # no tokenizer beside the graph: no text model
    assert not (tmp_path / "toy" / "cqil_text").exists()


def test_text_model_answers_what_cqil_generate_prints(text_repo, tiny_cqil_onnx, monkeypatch, capsys):
    model_dir = tiny_cqil_onnx[0]
    expected = {prompt: cqil_generate(model_dir, prompt, 10, capsys) for prompt in TEXT_PROMPTS}
    assert len(set(expected.values())) == len(TEXT_PROMPTS)  # different prompts, different texts
    model, _ = load_text_model(text_repo / "cqil_text" / "1", monkeypatch)
    requests = [text_request(p, max_tokens=10) for p in TEXT_PROMPTS]
    requests.append(text_request(TEXT_PROMPTS[0], parameters={"max_tokens": 10}))  # as request parameters (curl)
    requests.append(text_request(TEXT_PROMPTS[1], sampling_parameters=json.dumps({"max_tokens": 10})))  # vLLM's JSON
    for request, prompt in zip(run_requests(model, requests), [*TEXT_PROMPTS, *TEXT_PROMPTS[:2]]):
        assert request.sender.done and not request.sender.errors()
        [text] = request.sender.texts()  # not streamed: one response with the whole completion
        assert text.strip() == expected[prompt]
    assert max(FakeMetricFamily.values["cqil_text_step_rows"]) == len(requests)  # one graph call for all of them
    assert FakeMetricFamily.values["cqil_text_generated_tokens_total"] > 0
    assert len(FakeMetricFamily.values["cqil_text_time_to_first_token_seconds"]) == len(requests)


def test_text_model_streams_pieces_of_the_same_text(text_repo, tiny_cqil_onnx, monkeypatch, capsys):
    expected = cqil_generate(tiny_cqil_onnx[0], TEXT_PROMPTS[1], 12, capsys)
    model, _ = load_text_model(text_repo / "cqil_text" / "1", monkeypatch)
    streamed, counted, as_text = (text_request(TEXT_PROMPTS[1], max_tokens=12, stream=True),
                                  text_request(TEXT_PROMPTS[1], max_tokens=12, stream=True, return_finish_reason=True,
                                               return_num_output_tokens=True, sampling_parameters='{"ignore_eos": 1}'),
                                  text_request(TEXT_PROMPTS[1], parameters={"stream": "false", "max_tokens": 12}))
    run_requests(model, [streamed, counted, as_text])
    pieces = streamed.sender.texts()
    assert len(pieces) > 1 and "".join(pieces).strip() == expected
    assert streamed.sender.done and streamed.sender.sent[-1] is not None  # the last piece carries the final flag
    assert "".join(counted.sender.texts()).startswith("".join(pieces))
    reasons = [r.decode() for r in counted.sender.outputs("finish_reason")]
    assert reasons == [""] * (len(reasons) - 1) + ["length"]  # set on every response, the reason on the last
    assert sum(counted.sender.outputs("num_output_tokens")) == 12  # tokens per response add up
    assert len(as_text.sender.texts()) == 1  # "false" as a string is false: one response
    assert as_text.sender.texts()[0].strip() == expected


def test_text_model_fields(text_repo, monkeypatch):
    model, _ = load_text_model(text_repo / "cqil_text" / "1", monkeypatch)
    greedy = text_request(max_tokens=8, return_finish_reason=True, return_num_output_tokens=True)
    run_requests(model, [greedy])
    [whole] = greedy.sender.texts()
    [tokens] = greedy.sender.outputs("num_output_tokens")
    stop = whole.strip().split()[1] if len(whole.split()) > 1 else whole.strip()[1:3]

    model, _ = load_text_model(text_repo / "cqil_text" / "1", monkeypatch)
    cases = {
        "top1": text_request(max_tokens=8, temperature=5.0, top_k=1, random_seed=1),  # top_k 1: greedy at any T
        "seeded": text_request(max_tokens=8, temperature=5.0, random_seed=7),
        "same_seed": text_request(max_tokens=8, sampling_parameters=json.dumps({"temperature": 5.0, "seed": 7})),
        "hot": text_request(max_tokens=8, temperature=5.0, random_seed=8),
        "stop": text_request(max_tokens=8, stop=[stop], return_finish_reason=True),
        "stop_stream": text_request(max_tokens=8, stop=[stop], stream=True),
        "echo": text_request(max_tokens=8, exclude_input_in_output=False),
    }
    run_requests(model, list(cases.values()))
    texts = {name: r.sender.texts() for name, r in cases.items()}
    assert texts["top1"] == [whole]
    assert texts["seeded"] == texts["same_seed"] != texts["hot"] and texts["seeded"] != [whole]
    assert texts["stop"] == [whole[:whole.index(stop)]]  # ends before the stop string, which is left out
    assert cases["stop"].sender.outputs("finish_reason") == [b"stop"]
    assert "".join(texts["stop_stream"]) == texts["stop"][0]  # no piece sent the stop string's start
    assert texts["echo"] == [TEXT_PROMPTS[0] + whole]
    assert greedy.sender.outputs("finish_reason") in ([b"length"], [b"stop"]) and 1 <= tokens <= 8


BAD_FIELDS = [  # (fields, parameters, what the one error says)
    ({}, {}, "no text_input"),
    ({"max_tokens": 0}, {}, "max_tokens 0 must be between 1 and 512"),
    ({"max_tokens": 10_000}, {}, "max_tokens 10000 must be between 1 and 512"),
    ({}, {"stream": "maybe"}, "stream 'maybe' is not a boolean"),
    ({}, {"temperature": "hot"}, "temperature 'hot' is not a number"),
    ({"top_p": 1.5}, {}, "top_p 1.5 must be between 0 and 1"),
    ({"temperature": -1.0}, {}, "temperature -1.0 must be at least 0"),
    ({"sampling_parameters": "{not json"}, {}, "sampling_parameters is not JSON"),
    ({"sampling_parameters": '{"beam_width": 4}'}, {}, "unknown keys beam_width"),
    ({"sampling_parameters": '["temperature"]'}, {}, "one JSON object"),
    ({}, {"stop": [""]}, "list of non-empty strings"),
    ({}, {"max_tokens": 2.5}, "max_tokens 2.5 is not an integer"),
]


def test_text_model_answers_every_bad_field_with_one_error(text_repo, monkeypatch):
    model, _ = load_text_model(text_repo / "cqil_text" / "1", monkeypatch)
    bad = []
    for fields, parameters, _ in BAD_FIELDS:
        request = text_request(parameters=parameters, **fields)
        if not fields and not parameters:
            request.inputs.pop("text_input")
        bad.append(request)
    long = text_request(" ".join(["lambda"] * 400), max_tokens=400)  # past the tiny model's 512 positions
    good = text_request(max_tokens=4)
    run_requests(model, [*bad, long, good])
    for request, (_, _, message) in zip(bad + [long], BAD_FIELDS + [(None, None, "exceeds the model's context")]):
        assert request.sender.done and len(request.sender.sent) == 1, message  # one final error each
        [error] = request.sender.errors()
        assert message in error, error
        assert request.sender.sent[0].error.code == "INVALID_ARG"
    assert good.sender.done and not good.sender.errors() and good.sender.texts()  # the model serves the next


def test_text_model_full_queue_and_cancelled_client(text_repo, monkeypatch):
    model, _ = load_text_model(text_repo / "cqil_text" / "1", monkeypatch, parameters={"max_queue": "0"})
    refused = text_request(max_tokens=4)
    run_requests(model, [refused])
    assert refused.sender.errors() and "queue is full" in refused.sender.errors()[0]
    assert refused.sender.sent[0].error.code == "UNAVAILABLE"  # HTTP 503: the client may retry
    assert FakeMetricFamily.values["cqil_text_rejected_requests_total"] == 1

    model, _ = load_text_model(text_repo / "cqil_text" / "1", monkeypatch)
    leaving = text_request(max_tokens=40, stream=True, sampling_parameters='{"ignore_eos": true}', cancel_after=2)
    staying = text_request(max_tokens=20, sampling_parameters='{"ignore_eos": true}', return_num_output_tokens=True)
    run_requests(model, [leaving, staying])
    assert leaving.sender.done and leaving.sender.sent[-1].error.code == "CANCELLED"
    assert len(leaving.sender.sent) < 10  # it left the batch at once, long before its 40 tokens
    assert staying.sender.outputs("num_output_tokens") == [20] and not staying.sender.errors()


def test_text_model_refuses_a_stub_that_misreads_numpy(text_repo, monkeypatch):
    with pytest.raises(ModelException, match="stub misreads numpy"):
        load_text_model(text_repo / "cqil_text" / "1", monkeypatch, misread=True)


def test_pick_token_filters():
    from cqil.engines.triton_text_scheduler import Sampling, pick_token

    logits = np.array([0.0, 3.0, 2.9, -1.0, 2.8])
    rng = np.random.default_rng(0)
    assert pick_token(logits, Sampling(), rng) == 1 and pick_token(logits, Sampling(temperature=0), rng) == 1
    assert {pick_token(logits, Sampling(10.0, top_k=2), rng) for _ in range(200)} == {1, 2}
    assert {pick_token(logits, Sampling(10.0, top_p=0.5), rng) for _ in range(200)} == {1, 2, 4}
    assert {pick_token(logits, Sampling(10.0), rng) for _ in range(400)} == {0, 1, 2, 3, 4}


def test_text_model_streams_only_when_stream_is_true(text_repo, monkeypatch):
    model, _ = load_text_model(text_repo / "cqil_text" / "1", monkeypatch)
    prompt = np.array([TEXT_PROMPTS[1].encode()], dtype=object)

    def request(stream=None, as_tensor=False):
        inputs = {"text_input": prompt, "max_tokens": np.array([12], dtype=np.int32)}
        if as_tensor:
            inputs["stream"] = np.array([stream])
        return FakeRequest(inputs, parameters={} if stream is None or as_tensor else {"stream": stream})

    off = [request(), request(False), request("false"), request("False"), request(False, as_tensor=True)]
    on = [request(True), request("true"), request(True, as_tensor=True)]
    bad = request("maybe")
    run_requests(model, [*off, *on, bad])
    assert all(len(r.sender.texts()) == 1 for r in off)  # one response: the whole completion
    assert all(len(r.sender.texts()) > 1 for r in on)
    assert "stream 'maybe' is not a boolean" in bad.sender.errors()[0]
