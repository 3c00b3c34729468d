"""Triton Python-backend model: text in, text out, the convention of Triton's generate extension.

`cqil triton` writes this file as `<name>_text/1/model.py`, beside the exported `model.onnx`, its
tokenizer files and generation_config.json, with its `from cqil.export.contract import` line replaced
by the contract's own definitions (export/standalone.py), so it runs without cqil. Like the vLLM and
TensorRT-LLM backends it takes
`text_input` (and optionally `max_tokens`, `stream`, `temperature`, `top_k`, `top_p`, `random_seed`,
as input tensors or as request parameters) and answers `text_output`, so that

    curl -X POST localhost:8000/v2/models/<name>_text/generate -d '{"text_input": "...", "max_tokens": 32}'

works as it does for those backends. The model is decoupled: with `stream` true it sends one
response per new piece of text (`generate_stream` turns them into server-sent events), otherwise one
response holding the whole completion. The text is the prompt's continuation only, decoded without
special tokens, as `cqil generate --raw` prints it; no chat template is applied (as in vLLM's backend).

The KV cache lives here: each request runs its own greedy (or sampled) loop over the ONNX graph with
ONNX Runtime, feeding each step's presents back as the next past. Requests run on a thread pool
(parameter `max_in_flight`), so several are in flight at once: ONNX Runtime releases the GIL while it
runs and one session may serve several threads. Requests are not batched into one graph call.

Tensors cross the backend boundary through the stub's `as_numpy` / `Tensor(name, array)`. Strings
have no other way (DLPack has no string type), so a stub that misreads numpy arrays cannot serve this
model: the one in the nvidia-pytriton 0.7 wheel was built against numpy 1 and, under numpy 2, reads
an array's item size wrongly (a 30-byte prompt arrived as 30 copies of its first byte). `initialize`
probes for that and refuses to load with a message saying so, instead of answering garbage; the
tests run this model under numpy < 2 (docs/triton.md).
"""

import ctypes
import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime
import triton_python_backend_utils as pb_utils
from cqil.export.contract import TOKEN_INPUTS, mask_positions, output_names, past_names

DEFAULT_MAX_TOKENS = 16  # vLLM's default; TensorRT-LLM requires max_tokens
DEFAULT_MAX_IN_FLIGHT = 4
SAMPLING = {"temperature": float, "top_k": int, "top_p": float, "random_seed": int}
_CACHE_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class RequestError(ValueError):
    """A bad request: answered with this message, the model goes on serving."""


def pick_token(logits, temperature=None, top_k=None, top_p=None, rng=None):
    """Greedy without a positive temperature (as `cqil generate`), else a sample from the filtered softmax."""
    if not temperature or temperature <= 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    order = np.argsort(-scaled, kind="stable")
    if top_k and top_k > 0:
        order = order[:top_k]
    probs = np.exp(scaled[order] - scaled[order[0]])
    probs /= probs.sum()
    if top_p is not None and 0 < top_p < 1:
        keep = int(np.searchsorted(np.cumsum(probs), top_p)) + 1  # the smallest head reaching top_p
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return int(order[(rng or np.random.default_rng()).choice(len(order), p=probs)])


class TextGenerator:
    """Tokenizer + ONNX decoder with its KV cache: text -> stream of text pieces."""

    def __init__(self, folder, threads=None):
        from transformers import AutoTokenizer

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(os.path.join(folder, "model.onnx"), sess_options=options,
                                                    providers=["CPUExecutionProvider"])
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        layers = (len(self.session.get_outputs()) - 1) // 2
        self.output_names, self.past_names = output_names(layers), past_names(layers)
        inputs = {value.name: value for value in self.session.get_inputs()}
        self.past = [inputs[name] for name in self.past_names]
        self.cache_dtype = _CACHE_DTYPES[self.past[0].type]
        self.kv_heads, self.head_dim = self.past[0].shape[1], self.past[0].shape[3]
        settings = _read_json(os.path.join(folder, "config.json"))
        generation = _read_json(os.path.join(folder, "generation_config.json"))
        self.context = int(settings.get("max_position_embeddings") or 0) or None
        eos = generation.get("eos_token_id", settings.get("eos_token_id"))
        self.eos = {int(t) for t in (eos if isinstance(eos, list) else [eos]) if t is not None}
        if self.tokenizer.eos_token_id is not None:
            self.eos.add(int(self.tokenizer.eos_token_id))

    def tokens(self, prompt_ids, max_tokens, sampling=None, cancelled=lambda: False):
        """New token ids, one at a time, until EOS (not yielded), max_tokens or `cancelled()`."""
        sampling = dict(sampling or {})
        seed = sampling.pop("random_seed", None)
        rng = np.random.default_rng(seed)
        ids = np.array([prompt_ids], dtype=np.int64)
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=self.cache_dtype)
        past = dict.fromkeys(self.past_names, empty)
        length = 0
        for _ in range(max_tokens):
            if cancelled():
                return
            total = length + ids.shape[1]
            mask = np.ones((1, total), dtype=np.int64)
            feed = {**dict(zip(TOKEN_INPUTS, (ids, mask, mask_positions(mask, ids.shape[1])))), **past}
            logits, *presents = self.session.run(self.output_names, feed)
            token = pick_token(logits[0, -1], rng=rng, **sampling)
            if token in self.eos:
                return
            yield token
            past = dict(zip(self.past_names, presents))
            ids, length = np.array([[token]], dtype=np.int64), total

    def pieces(self, text, max_tokens, sampling=None, cancelled=lambda: False):
        """The completion of `text` as pieces of text whose concatenation is its whole decoding."""
        prompt = self.tokenizer.encode(text, add_special_tokens=False)
        if not prompt:
            raise RequestError("text_input is empty: send the prompt text")
        if self.context and len(prompt) + max_tokens > self.context:
            raise RequestError(f"the prompt ({len(prompt)} tokens) plus max_tokens {max_tokens} exceeds the "
                               f"model's context of {self.context} tokens: shorten one of them")
        new, sent = [], ""
        for token in self.tokens(prompt, max_tokens, sampling, cancelled):
            new.append(token)
            text_so_far = self.tokenizer.decode(new, skip_special_tokens=True)
            # hold back a piece that ends inside a multi-byte character or rewrites earlier text
            if not text_so_far.endswith("\ufffd") and text_so_far.startswith(sent) and len(text_so_far) > len(sent):
                yield text_so_far[len(sent):]
                sent = text_so_far
        final = self.tokenizer.decode(new, skip_special_tokens=True)
        if final != sent:
            yield final.removeprefix(sent)


def stub_misreads_numpy():
    """True when the stub reads numpy arrays with the wrong item size (built against another numpy)."""
    capsule = np.array([1, 2, 3], dtype=np.int64).__dlpack__()
    tensor = pb_utils.Tensor.from_dlpack("probe", capsule)
    ctypes.pythonapi.PyCapsule_SetName.argtypes = (ctypes.py_object, ctypes.c_char_p)
    ctypes.pythonapi.PyCapsule_SetName(capsule, b"used_dltensor")  # as triton_python_model.py explains
    return tensor.as_numpy().tolist() != [1, 2, 3]


def _read_json(path):
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _scalar(request, name, parameters):
    """An optional setting: the input tensor `name`, else the request parameter `name`, else None."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is not None:
        return tensor.as_numpy().reshape(-1)[0].item()
    return parameters.get(name)


def _flag(value, name):
    """A boolean setting: a BOOL tensor or JSON true/false, or the text "true"/"false" (curl users send it)."""
    if value is None:
        return False
    if isinstance(value, str):
        if value.strip().lower() not in ("true", "false"):
            raise RequestError(f"{name} {value!r} is not true or false")
        return value.strip().lower() == "true"
    return bool(value)


def _text_input(request):
    tensor = pb_utils.get_input_tensor_by_name(request, "text_input")
    if tensor is None:
        raise RequestError("no text_input: send {\"text_input\": \"...\"}")
    value = tensor.as_numpy().reshape(-1)
    if value.size != 1:
        raise RequestError(f"text_input holds {value.size} strings: send one prompt per request")
    value = value[0]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _text_tensor(text):
    return pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_))


class TritonPythonModel:
    def initialize(self, args):
        if stub_misreads_numpy():
            raise pb_utils.TritonModelException(
                f"this Python-backend stub misreads numpy {np.__version__} arrays (it was built against another "
                "numpy), so text cannot cross it: serve this model with the numpy it was built for (numpy<2 "
                "for the nvidia-pytriton 0.7 stub) on the PATH of the server or in EXECUTION_ENV_PATH")
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("the text model must be decoupled: "
                                                "model_transaction_policy { decoupled: true }")
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        folder = os.path.join(args["model_repository"], args["model_version"])
        self.generator = TextGenerator(folder)
        self.pool = ThreadPoolExecutor(int(parameters.get("max_in_flight", DEFAULT_MAX_IN_FLIGHT)),
                                       thread_name_prefix="cqil-text")

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                job = self._parse(request)
            except (RequestError, ValueError, TypeError) as exc:
                sender.send(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc))),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            self.pool.submit(self._serve, sender, *job)

    def _parse(self, request):
        text = _text_input(request)
        parameters = json.loads(request.parameters() or "{}") if hasattr(request, "parameters") else {}
        max_tokens = _scalar(request, "max_tokens", parameters)
        max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else int(max_tokens)
        if max_tokens < 1:
            raise RequestError(f"max_tokens {max_tokens} must be at least 1")
        stream = _flag(_scalar(request, "stream", parameters), "stream")
        sampling = {}
        for name, kind in SAMPLING.items():
            value = _scalar(request, name, parameters)
            if value is not None:
                sampling[name] = kind(value)
        return text, max_tokens, stream, sampling

    def _serve(self, sender, text, max_tokens, stream, sampling):
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        cancelled = getattr(sender, "is_cancelled", lambda: False)
        try:
            pieces = self.generator.pieces(text, max_tokens, sampling, cancelled)
            if stream:
                for piece in pieces:
                    sender.send(pb_utils.InferenceResponse(output_tensors=[_text_tensor(piece)]))
                sender.send(flags=final)
            else:
                sender.send(pb_utils.InferenceResponse(output_tensors=[_text_tensor("".join(pieces))]), flags=final)
        except Exception as exc:  # noqa: BLE001 -- the request gets the error, the model serves the next one
            message = str(exc) if isinstance(exc, RequestError) else f"{type(exc).__name__}: {exc}"
            sender.send(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message)),
                        flags=final)

    def finalize(self):
        self.pool.shutdown(wait=True)
