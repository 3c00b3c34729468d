"""The base of every engine runner: one check of a call against the ONNX contract, then the engine runs.

In the spirit of Polygraphy's BaseRunner (a runner takes a feed dict and returns outputs by name),
with the call shape of `CqilModel` on top — `(input_ids, attention_mask, position_ids,
past_key_values) -> (logits, presents)` with torch tensors and a flat cache — so validation, bench and
greedy generation treat every engine alike, and a bad call gets the same one-line CqilError from
ONNX Runtime as from TensorRT, before either engine sees it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from cqil.export.contract import (
    ContractSpec,
    empty_past,
    flat_presents,
    named_past,
    output_names,
)
from cqil.model.cqil import positions_from_mask
from cqil.model.errors import CqilError


class ContractRunner:
    """Checks and builds the feed of one call; a subclass runs it in `infer`."""

    def __init__(self, path: Path, spec: ContractSpec):
        self.path, self.spec = Path(path), spec
        try:
            self.cache_dtype = spec.cache_dtype
        except CqilError as exc:
            raise CqilError(f"'{self.path}': {exc}") from exc
        self.outputs = output_names(spec.num_layers)

    @property
    def plan(self):
        return self.spec.plan

    def feeds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              position_ids: torch.Tensor | None = None,
              past_key_values: Sequence[torch.Tensor] | None = None) -> dict[str, np.ndarray]:
        """The contract's input dict, checked: names, dtypes, shapes, past and mask lengths.

        An absent mask is all ones, absent positions follow the mask, an absent cache is past = 0.
        """
        _check_tokens("input_ids", input_ids, 2)
        batch, seq = input_ids.shape
        past = named_past(past_key_values, self.spec.num_layers) if past_key_values else {}
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
        for index, value in enumerate(past.values()):
            if value.is_complex() or not value.is_floating_point() or tuple(value.shape) != expected:
                raise CqilError(f"past_key_values[{index}] is {value.dtype} {tuple(value.shape)}, expected a float "
                                f"tensor [batch, kv_heads, past, head_dim] = {list(expected)}")
        tokens = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        feeds = {name: np.ascontiguousarray(value.cpu().numpy().astype(np.int64)) for name, value in tokens.items()
                 if name in self.spec.inputs}
        if not past:
            return {**feeds, **empty_past(self.spec, batch)}
        return {**feeds, **{name: np.ascontiguousarray(value.detach().cpu().numpy().astype(self.cache_dtype))
                            for name, value in past.items()}}

    def infer(self, feeds: dict[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        """Run a checked feed; every output of `self.outputs` by name, in arrays the caller may keep."""
        raise NotImplementedError

    def bind(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             position_ids: torch.Tensor | None = None,
             past_key_values: Sequence[torch.Tensor] | None = None) -> Callable[[], Mapping[str, np.ndarray]]:
        """One call with its feed checked and converted once: what a benchmark repeats is the engine alone."""
        feeds = self.feeds(input_ids, attention_mask, position_ids, past_key_values)
        return lambda: self.infer(feeds)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None,
                 past_key_values: Sequence[torch.Tensor] | None = None,
                 ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        outputs = self.infer(self.feeds(input_ids, attention_mask, position_ids, past_key_values))
        presents = flat_presents(outputs, self.spec.num_layers)
        return torch.from_numpy(outputs["logits"]), tuple(torch.from_numpy(value) for value in presents)


def _check_tokens(name: str, value: torch.Tensor, dims: int) -> None:
    """Token inputs are integer tensors; a float here is a caller's bug, not something to cast."""
    if not isinstance(value, torch.Tensor) or value.dtype.is_floating_point or value.dtype.is_complex \
            or value.dtype == torch.bool or value.dim() != dims:
        what = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise CqilError(f"{name} is {what}: expected an integer tensor of {dims} dims [batch, ...]")
