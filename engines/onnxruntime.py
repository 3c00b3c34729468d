"""ONNX Runtime engine: a session factory and a runner that speaks the KV-cache contract.

The runner has the same call shape as `CqilModel` — `(input_ids, attention_mask, position_ids,
past_key_values) -> (logits, presents)` with torch tensors and a flat cache — so validation, bench
and greedy generation treat every engine alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from engines.kv_contract import ContractSpec, find_onnx, read_contract
from export.contract import output_names, past_pair
from pipeline.model.cqil import positions_from_mask
from pipeline.model.errors import CqilError

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
OPT_LEVELS = ("disable", "basic", "extended", "all")
_NUMPY_DTYPES = {"FLOAT": np.float32, "FLOAT16": np.float16}


def available_providers(wanted: Sequence[str] | None = None) -> list[str]:
    """The installed execution providers, in our order of preference (or the order asked for)."""
    import onnxruntime as ort

    installed = set(ort.get_available_providers())
    order = list(wanted) if wanted else list(PREFERRED_PROVIDERS)
    missing = [p for p in order if p not in installed] if wanted else []
    if missing:
        raise CqilError(f"execution provider(s) {', '.join(missing)} not installed here; "
                        f"available: {', '.join(sorted(installed))}")
    return [p for p in order if p in installed]


def create_session(onnx_path: Path, providers: Sequence[str] | None = None, threads: int | None = None,
                   opt_level: str = "all", optimized_model: Path | None = None, spin: bool = True):
    """An InferenceSession with explicit threads and graph optimization level.

    `optimized_model` saves the graph after ONNX Runtime's optimizations (what it really runs).
    `spin=False` stops the intra-op threads from busy-waiting after a run: with several sessions
    timed in turn in one process (cqil bench), a spinning pool steals the cores of the next one.
    """
    import onnxruntime as ort

    if opt_level not in OPT_LEVELS:
        raise CqilError(f"graph optimization level '{opt_level}' is not one of {', '.join(OPT_LEVELS)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opt_level]
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimized_model is not None:
        Path(optimized_model).parent.mkdir(parents=True, exist_ok=True)
        options.optimized_model_filepath = str(optimized_model)
    options.log_severity_level = 3
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(onnx_path), sess_options=options,
                                    providers=available_providers(providers))
    except CqilError:
        raise
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
        raise CqilError(f"ONNX Runtime could not load '{onnx_path}' ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200]}): export it again with `cqil export`") from exc


class OrtRunner:
    """Runs an exported decoder with ONNX Runtime; call it like `CqilModel`."""

    def __init__(self, onnx: Path, providers: Sequence[str] | None = None, threads: int | None = None,
                 opt_level: str = "all", optimized_model: Path | None = None, spin: bool = True):
        self.path = find_onnx(Path(onnx))
        self.spec: ContractSpec = read_contract(self.path)
        self.session = create_session(self.path, providers, threads, opt_level, optimized_model, spin)
        self.cache_dtype = _NUMPY_DTYPES.get(self.spec.kv_dtype)
        if self.cache_dtype is None:
            raise CqilError(f"'{self.path}': cache element type {self.spec.kv_dtype} is not supported")
        self.outputs = output_names(self.spec.num_layers)

    @property
    def plan(self):
        return self.spec.plan

    def feeds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              position_ids: torch.Tensor | None = None,
              past_key_values: Sequence[torch.Tensor] | None = None) -> dict[str, np.ndarray]:
        """The contract's input dict; an absent cache is fed as past = 0."""
        _check_tokens("input_ids", input_ids, 2)
        batch, seq = input_ids.shape
        if past_key_values and len(past_key_values) != 2 * self.spec.num_layers:
            raise CqilError(f"past_key_values holds {len(past_key_values)} tensors, expected "
                            f"2 x {self.spec.num_layers} layers (k0, v0, k1, v1, ...)")
        past_len = past_key_values[0].shape[2] if past_key_values else 0
        if attention_mask is None:
            attention_mask = torch.ones(batch, past_len + seq, dtype=torch.long)
        if attention_mask.shape != (batch, past_len + seq):
            raise CqilError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                            f"[batch, past + seq] = [{batch}, {past_len + seq}]")
        _check_tokens("attention_mask", attention_mask, 2)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, seq)
        _check_tokens("position_ids", position_ids, 2)
        if position_ids.shape != (batch, seq):
            raise CqilError(f"position_ids has shape {tuple(position_ids.shape)}, expected [batch, seq] = "
                            f"[{batch}, {seq}]")
        expected = (batch, self.spec.kv_heads, past_len, self.spec.head_dim)
        for index, value in enumerate(past_key_values or ()):
            if value.is_complex() or not value.is_floating_point() or tuple(value.shape) != expected:
                raise CqilError(f"past_key_values[{index}] is {value.dtype} {tuple(value.shape)}, expected a float "
                                f"tensor [batch, kv_heads, past, head_dim] = {list(expected)}")
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        feeds = {name: np.ascontiguousarray(value.cpu().numpy().astype(np.int64)) for name, value in feeds.items()
                 if name in self.spec.inputs}
        empty = np.zeros((batch, self.spec.kv_heads, 0, self.spec.head_dim), dtype=self.cache_dtype)
        for layer in range(self.spec.num_layers):
            for slot, name in enumerate(past_pair(layer)):
                value = past_key_values[2 * layer + slot] if past_key_values else None
                feeds[name] = empty if value is None else np.ascontiguousarray(
                    value.detach().cpu().numpy().astype(self.cache_dtype))
        return feeds

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None,
                 past_key_values: Sequence[torch.Tensor] | None = None,
                 ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        feeds = self.feeds(input_ids, attention_mask, position_ids, past_key_values)
        try:
            results = self.session.run(self.outputs, feeds)
        except Exception as exc:  # ORT's own error types; their messages span lines
            raise CqilError(f"ONNX Runtime failed on '{self.path}' ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200]})") from exc
        return torch.from_numpy(results[0]), tuple(torch.from_numpy(r) for r in results[1:])


def _check_tokens(name: str, value: torch.Tensor, dims: int) -> None:
    """Token inputs are integer tensors; a float here is a caller's bug, not something to cast."""
    if not isinstance(value, torch.Tensor) or value.dtype.is_floating_point or value.dtype.is_complex \
            or value.dtype == torch.bool or value.dim() != dims:
        what = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise CqilError(f"{name} is {what}: expected an integer tensor of {dims} dims [batch, ...]")
