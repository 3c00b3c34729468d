"""Triton Python-backend model: text in, text out, the convention of Triton's generate extension.

`cqil triton` writes this file as `<name>_text/1/model.py` (the contract's names written in), beside `triton_text_scheduler.py` (the
in-flight batching it imports), the exported `model.onnx`, its tokenizer files and
generation_config.json. Like the vLLM and TensorRT-LLM backends it takes `text_input` and the fields
their users send (`max_tokens`, `stream`, `temperature`, `top_p`, `top_k`, `random_seed`, `stop`,
`exclude_input_in_output`, `sampling_parameters` as one JSON string as the vLLM backend takes it,
`return_finish_reason`, `return_num_output_tokens`), as input tensors or as request parameters, and
answers `text_output` (plus `finish_reason` / `num_output_tokens` where asked), so that

    curl -X POST localhost:8000/v2/models/<name>_text/generate -d '{"text_input": "...", "max_tokens": 32}'

works as it does for those backends. The model is decoupled: with `stream` true it sends one
response per new piece of text (`generate_stream` turns them into server-sent events), otherwise one
response holding the whole completion. The text is the prompt's continuation only (unless
`exclude_input_in_output` is false), decoded without special tokens, as `cqil generate --raw` prints
it; no chat template is applied (as in vLLM's backend).

`execute` only parses and checks each request and queues it; the scheduler's thread owns the ONNX
Runtime session and runs one graph call per step for every request in flight (in-flight batching,
triton_text_scheduler.py). A bad field or a full queue answers that request at once with one error;
the model serves the next. A client that disconnects (`is_cancelled`) leaves the batch at the next
step. Counters and histograms go to Triton's metrics endpoint through `pb_utils.MetricFamily`.

Tensors cross the backend boundary through the stub's `as_numpy` / `Tensor(name, array)`. Strings
have no other way (DLPack has no string type), so a stub that misreads numpy arrays cannot serve this
model: the one in the nvidia-pytriton 0.7 wheel was built against numpy 1 and, under numpy 2, reads
an array's item size wrongly (a 30-byte prompt arrived as 30 copies of its first byte). `initialize`
probes for that and refuses to load with a message saying so, instead of answering garbage; the
tests run this model under numpy < 2 (docs/triton.md).
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time

import numpy as np
import onnxruntime
import triton_python_backend_utils as pb_utils
from cqil.export.contract import LOGITS, TOKEN_INPUTS, past_pair, present_pair

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the scheduler is copied beside this file
from triton_text_scheduler import (  # noqa: E402
    FINISH_CANCELLED,
    Decoder,
    GraphNames,
    Job,
    Metrics,
    QueueFull,
    Sampling,
    Scheduler,
)

# The ONNX contract's tensor names (DESIGN.md section 4): `cqil triton` writes this file with the import
# above replaced by export/contract.py's definitions (export/standalone.py), so it runs without cqil.
GRAPH_NAMES = GraphNames(*TOKEN_INPUTS, logits=LOGITS, past_prefix=past_pair(0)[0].removesuffix("0.key"),
                         present_prefix=present_pair(0)[0].removesuffix("0.key"))
DEFAULT_MAX_TOKENS = 16  # vLLM's default; TensorRT-LLM requires max_tokens
# Config `parameters` and their defaults (engines/triton.py writes the same values into config.pbtxt).
DEFAULT_PARAMETERS = {"max_batch": "16", "max_queue": "64", "max_prefill_tokens": "1024", "join_wait_steps": "4",
                      "max_tokens_limit": "512", "onnxruntime_threads": "0"}
# What `sampling_parameters` (vLLM's SamplingParams names) may hold, and the field each one sets.
SAMPLING_KEYS = {"max_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                 "seed": "random_seed", "stop": "stop", "ignore_eos": "ignore_eos"}
TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


class RequestError(ValueError):
    """A bad request: answered with this message, the model goes on serving."""


# -- reading one request ----------------------------------------------------------------------------------

def _tensor_value(request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if name == "stop":
        return [_text(v) for v in values]
    if values.size != 1:
        raise RequestError(f"{name} holds {values.size} values: send one")
    value = values[0]
    return _text(value) if isinstance(value, (bytes, np.bytes_, str)) else value.item()


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def _boolean(name: str, value) -> bool:
    """A real boolean: the string "false" is false (a plain `bool("false")` would be true)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
        return value.strip().lower() in TRUE
    raise RequestError(f"{name} {value!r} is not a boolean: send true or false")


def _number(name: str, value, kind: type, low: float | None = None, high: float | None = None):
    try:
        if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise ValueError
        number = kind(value)
    except (TypeError, ValueError):
        raise RequestError(f"{name} {value!r} is not {'an integer' if kind is int else 'a number'}") from None
    if (low is not None and number < low) or (high is not None and number > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise RequestError(f"{name} {number} must be {bounds}")
    return number


def _stop(value) -> tuple[str, ...]:
    strings = [value] if isinstance(value, str) else value
    if not isinstance(strings, (list, tuple)) or not all(isinstance(s, str) and s for s in strings):
        raise RequestError(f"stop {value!r} must be a string or a list of non-empty strings")
    return tuple(strings)


class Settings:
    """One request's fields: input tensors first, then `sampling_parameters`, then request parameters."""

    def __init__(self, request, max_tokens_limit: int):
        parameters = json.loads(request.parameters() or "{}") if hasattr(request, "parameters") else {}
        fields = dict(parameters)
        sampling_json = _tensor_value(request, "sampling_parameters")
        if sampling_json is None:
            sampling_json = parameters.get("sampling_parameters")
        if sampling_json is not None:
            fields.update(self._sampling_parameters(sampling_json))
        for name in ("max_tokens", "stream", "temperature", "top_p", "top_k", "random_seed", "stop",
                     "exclude_input_in_output", "return_finish_reason", "return_num_output_tokens"):
            value = _tensor_value(request, name)
            if value is not None:
                fields[name] = value
        get = fields.get
        self.max_tokens = _number("max_tokens", get("max_tokens", DEFAULT_MAX_TOKENS), int, 1, max_tokens_limit)
        self.stream = _boolean("stream", get("stream", False))
        self.exclude_input = _boolean("exclude_input_in_output", get("exclude_input_in_output", True))
        self.return_finish_reason = _boolean("return_finish_reason", get("return_finish_reason", False))
        self.return_num_output_tokens = _boolean("return_num_output_tokens", get("return_num_output_tokens", False))
        self.stop = _stop(get("stop", []))
        optional = {"temperature": (float, 0, None), "top_p": (float, 0, 1), "top_k": (int, None, None),
                    "random_seed": (int, 0, 2**64 - 1)}
        values = {name: None if get(name) is None else _number(name, get(name), *bounds)
                  for name, bounds in optional.items()}
        if values["top_p"] == 0:
            raise RequestError("top_p 0 keeps no token: send a value in (0, 1]")
        self.sampling = Sampling(values["temperature"], values["top_k"], values["top_p"], values["random_seed"],
                                 _boolean("ignore_eos", get("ignore_eos", False)))

    @staticmethod
    def _sampling_parameters(text) -> dict:
        try:
            values = json.loads(text) if isinstance(text, str) else text
        except json.JSONDecodeError as exc:
            raise RequestError(f"sampling_parameters is not JSON ({exc.msg}): send one JSON object") from None
        if not isinstance(values, dict):
            raise RequestError("sampling_parameters must be one JSON object, e.g. {\"temperature\": 0.7}")
        unknown = sorted(set(values) - set(SAMPLING_KEYS))
        if unknown:
            raise RequestError(f"sampling_parameters has unknown keys {', '.join(unknown)} "
                               f"(this model reads {', '.join(SAMPLING_KEYS)})")
        return {SAMPLING_KEYS[key]: value for key, value in values.items()}


def _prompt(request) -> str:
    tensor = pb_utils.get_input_tensor_by_name(request, "text_input")
    if tensor is None:
        raise RequestError("no text_input: send {\"text_input\": \"...\"}")
    value = tensor.as_numpy().reshape(-1)
    if value.size != 1:
        raise RequestError(f"text_input holds {value.size} strings: send one prompt per request")
    return _text(value[0])


# -- the text of one request ------------------------------------------------------------------------------

class TextStream:
    """A request's tokens as text, piece by piece.

    A piece never ends inside a multi-byte character, never rewrites text already sent, and never
    sends what may be the start of a stop string; the text ends before the first stop string (which is
    left out, as in vLLM).
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.text, self.sent, self.stopped = "", "", False
        self.unsent_tokens = 0

    def push(self, token: int) -> bool:
        """Add a token; False once a stop string has appeared."""
        self.tokens.append(token)
        self.unsent_tokens += 1
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        hits = [self.text.find(s) for s in self.stop if s in self.text]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
        return not self.stopped

    def piece(self, final: bool = False) -> str:
        """The text not sent yet that is safe to send now (all of it when `final`)."""
        safe = self.text
        if not final:
            if safe.endswith("\ufffd"):
                return ""
            held = max((n for s in self.stop for n in range(len(s) - 1, 0, -1) if safe.endswith(s[:n])), default=0)
            safe = safe[:len(safe) - held]
            if not safe.startswith(self.sent) or len(safe) == len(self.sent):
                return ""
        new = safe[len(self.sent):] if safe.startswith(self.sent) else safe.removeprefix(self.sent)
        self.sent = safe
        return new


class Reply:
    """Sends one request's responses (from the scheduler's thread): its Job callbacks never raise."""

    def __init__(self, sender, settings: Settings, stream: TextStream, prefix: str):
        self.sender, self.settings, self.stream, self.prefix = sender, settings, stream, prefix
        self.whole = ""  # what a non-streamed request answers

    def cancelled(self) -> bool:
        return bool(getattr(self.sender, "is_cancelled", lambda: False)())

    def on_token(self, token: int) -> bool:
        going = self.stream.push(token)
        if going and self.settings.stream:
            piece = self.stream.piece()
            if piece:
                self._send(piece, "", final=False)
        return going

    def on_finish(self, reason: str, error: str | None) -> None:
        if error is not None or reason == FINISH_CANCELLED:
            code = pb_utils.TritonError.CANCELLED if error is None else pb_utils.TritonError.INTERNAL
            self._safe_send(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(
                error or "cancelled by the client", code)))
            return
        text = self.stream.piece(final=True)
        if not self.settings.stream:
            text = self.stream.sent
        self._send(text, reason, final=True)

    def _send(self, text: str, reason: str, final: bool) -> None:
        text, self.prefix = self.prefix + text, ""
        outputs = [_strings("text_output", text)]
        if self.settings.return_finish_reason:
            outputs.append(_strings("finish_reason", reason))
        if self.settings.return_num_output_tokens:
            outputs.append(pb_utils.Tensor("num_output_tokens",
                                           np.array([self.stream.unsent_tokens], dtype=np.uint32)))
        self.stream.unsent_tokens = 0
        response = pb_utils.InferenceResponse(output_tensors=outputs)
        if final:
            self._safe_send(response)
        else:
            try:
                self.sender.send(response)
            except Exception:  # noqa: BLE001 -- the client is gone; is_cancelled ends the row at the next step
                pass

    def _safe_send(self, response) -> None:
        try:
            self.sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception:  # noqa: BLE001 -- the client is gone: nothing left to tell it
            pass


def _strings(name: str, text: str):
    return pb_utils.Tensor(name, np.array([text.encode("utf-8")], dtype=np.object_))


def _error(sender, message: str, code=None) -> None:
    error = pb_utils.TritonError(message, code if code is not None else pb_utils.TritonError.INVALID_ARG)
    sender.send(pb_utils.InferenceResponse(output_tensors=[], error=error),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


# -- metrics ------------------------------------------------------------------------------------------------

class TritonMetrics(Metrics):
    """The scheduler's reports as custom metrics on Triton's metrics port (pb_utils.MetricFamily)."""

    ROW_BUCKETS = [1, 2, 4, 8, 16, 32, 64]
    SECOND_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]

    def __init__(self, labels: dict[str, str]):
        family = pb_utils.MetricFamily
        self._families = []  # a Metric fails once its MetricFamily is garbage-collected: keep them

        def metric(name, description, kind, **kwargs):
            self._families.append(family(name=name, description=description, kind=kind))
            return self._families[-1].Metric(labels=labels, **kwargs)

        self._tokens = metric("cqil_text_generated_tokens_total", "Tokens generated", family.COUNTER)
        self._rejected = metric("cqil_text_rejected_requests_total", "Requests refused: the queue was full",
                                family.COUNTER)
        self._queue = metric("cqil_text_queue_length", "Requests waiting to join the batch", family.GAUGE)
        self._rows = metric("cqil_text_step_rows", "Active rows (requests) per batched decode step",
                            family.HISTOGRAM, buckets=self.ROW_BUCKETS)
        self._ttft = metric("cqil_text_time_to_first_token_seconds", "Queue + prefill time to the first token",
                            family.HISTOGRAM, buckets=self.SECOND_BUCKETS)

    def step(self, rows: int) -> None:
        self._rows.observe(rows)

    def tokens(self, count: int) -> None:
        self._tokens.increment(count)

    def queue(self, length: int) -> None:
        self._queue.set(length)

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def rejected(self) -> None:
        self._rejected.increment(1)


# -- the model ---------------------------------------------------------------------------------------------

def stub_misreads_numpy() -> bool:
    """True when the stub reads numpy arrays with the wrong item size (built against another numpy)."""
    capsule = np.array([1, 2, 3], dtype=np.int64).__dlpack__()
    tensor = pb_utils.Tensor.from_dlpack("probe", capsule)
    ctypes.pythonapi.PyCapsule_SetName.argtypes = (ctypes.py_object, ctypes.c_char_p)
    ctypes.pythonapi.PyCapsule_SetName(capsule, b"used_dltensor")  # as triton_python_model.py explains
    return tensor.as_numpy().tolist() != [1, 2, 3]


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _parameters(config: dict) -> dict[str, int]:
    given = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
    values = {}
    for key, default in DEFAULT_PARAMETERS.items():
        try:
            values[key] = int(given.get(key, default))
        except ValueError:
            raise pb_utils.TritonModelException(f"config parameter {key} {given[key]!r} is not an integer") from None
    return values


class TritonPythonModel:
    def initialize(self, args):
        from transformers import AutoTokenizer

        if stub_misreads_numpy():
            raise pb_utils.TritonModelException(
                f"this Python-backend stub misreads numpy {np.__version__} arrays (it was built against another "
                "numpy), so text cannot cross it: serve this model with the numpy it was built for (numpy<2 "
                "for the nvidia-pytriton 0.7 stub) on the PATH of the server or in EXECUTION_ENV_PATH")
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("the text model must be decoupled: "
                                                "model_transaction_policy { decoupled: true }")
        parameters = _parameters(config)
        folder = os.path.join(args["model_repository"], args["model_version"])
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = parameters["onnxruntime_threads"]  # 0: ONNX Runtime's default
        session = onnxruntime.InferenceSession(os.path.join(folder, "model.onnx"), sess_options=options,
                                               providers=["CPUExecutionProvider"])
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        settings = _read_json(os.path.join(folder, "config.json"))
        generation = _read_json(os.path.join(folder, "generation_config.json"))
        self.context = int(settings.get("max_position_embeddings") or 0) or None
        eos = generation.get("eos_token_id", settings.get("eos_token_id"))
        eos_ids = {int(t) for t in (eos if isinstance(eos, list) else [eos]) if t is not None}
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(int(self.tokenizer.eos_token_id))
        self.max_tokens_limit = parameters["max_tokens_limit"]
        labels = {"model": args.get("model_name", config.get("name", "")), "version": args["model_version"]}
        self.scheduler = Scheduler(Decoder(session, eos_ids, GRAPH_NAMES), max_batch=parameters["max_batch"],
                                   max_queue=parameters["max_queue"],
                                   max_prefill_tokens=parameters["max_prefill_tokens"],
                                   join_wait_steps=parameters["join_wait_steps"], metrics=TritonMetrics(labels))
        self.scheduler.warm_up(self.context)  # ONNX Runtime's arena at its working size before the first request
        self.scheduler.start()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                job = self._job(request, sender)
            except RequestError as exc:
                _error(sender, str(exc))
                continue
            try:
                self.scheduler.submit(job)
            except QueueFull as exc:
                _error(sender, str(exc), pb_utils.TritonError.UNAVAILABLE)

    def _job(self, request, sender) -> Job:
        submitted = time.monotonic()
        text = _prompt(request)
        settings = Settings(request, self.max_tokens_limit)
        prompt = self.tokenizer.encode(text, add_special_tokens=False)
        if not prompt:
            raise RequestError("text_input is empty: send the prompt text")
        if self.context and len(prompt) + settings.max_tokens > self.context:
            raise RequestError(f"the prompt ({len(prompt)} tokens) plus max_tokens {settings.max_tokens} exceeds the "
                               f"model's context of {self.context} tokens: shorten one of them")
        prefix = "" if settings.exclude_input else text
        reply = Reply(sender, settings, TextStream(self.tokenizer, settings.stop), prefix)
        return Job(prompt, settings.max_tokens, reply.on_token, reply.on_finish, settings.sampling, reply.cancelled,
                   submitted)

    def finalize(self):
        self.scheduler.close()
