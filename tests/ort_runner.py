"""A minimal ONNX Runtime (CPU) driver for exported decoders, fed by the contract's names only.

Kept apart from engines/onnxruntime.py on purpose: the export tests check the files with a driver that
shares no code with the runner that validate and bench use.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch


def session(model) -> ort.InferenceSession:
    """A CPU session on a model path or serialized bytes, one thread (the test machine is shared)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options, providers=["CPUExecutionProvider"])


def empty_past(sess: ort.InferenceSession, batch: int) -> list[np.ndarray]:
    """Zero-length past tensors (prefill), shaped from the graph's own past inputs."""
    past = []
    for spec in sess.get_inputs()[3:]:
        dtype = np.float16 if spec.type == "tensor(float16)" else np.float32
        past.append(np.zeros((batch, spec.shape[1], 0, spec.shape[3]), dtype))
    return past


def run(sess: ort.InferenceSession, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        past: list[np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """One step: logits and the flat presents (k0, v0, k1, v1, ...); positions from the mask."""
    seq = input_ids.shape[1]
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -seq:]
    past = empty_past(sess, input_ids.shape[0]) if past is None else past
    feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy(),
             "position_ids": positions.numpy()}
    feeds.update({spec.name: value for spec, value in zip(sess.get_inputs()[3:], past)})
    logits, *presents = sess.run(None, feeds)
    return logits, presents


def greedy(sess: ort.InferenceSession, input_ids: torch.Tensor, attention_mask: torch.Tensor,
           max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding through ORT with its own presents as the cache: the new tokens [batch, n]."""
    logits, past = run(sess, input_ids, attention_mask)
    tokens = []
    for _ in range(max_new_tokens):
        token = torch.from_numpy(logits[:, -1].argmax(-1))
        tokens.append(token)
        attention_mask = torch.cat((attention_mask, attention_mask.new_ones(len(token), 1)), 1)
        logits, past = run(sess, token[:, None], attention_mask, past)
    return torch.stack(tokens, 1)
