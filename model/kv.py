"""The KV cache as the contract holds it: flat (k0, v0, k1, v1, ...), each [batch, kv_heads, past, head_dim].

One layer's cache is a (key, value) pair; the flat order is the ONNX contract's (DESIGN.md section 4).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

KV = tuple[torch.Tensor, torch.Tensor]


def layer_pairs(flat: Sequence[torch.Tensor | None] | None, num_layers: int) -> list[KV | None]:
    """Per-layer (key, value) pairs of a flat cache; None for a layer without one (or every layer, for no cache)."""
    if not flat:
        return [None] * num_layers
    return [None if flat[2 * i] is None else (flat[2 * i], flat[2 * i + 1]) for i in range(num_layers)]


def flatten(pairs: Sequence[KV]) -> tuple[torch.Tensor, ...]:
    """(k0, v0, k1, v1, ...) from per-layer pairs."""
    return tuple(tensor for pair in pairs for tensor in pair)


def past_length(flat: Sequence[torch.Tensor | None] | None) -> int:
    """Tokens already in a flat cache (0 for none)."""
    present = [tensor for tensor in flat or () if tensor is not None]
    return present[0].shape[2] if present else 0


def make_cache(num_layers: int, batch: int, kv_heads: int, past: int, head_dim: int, dtype: torch.dtype,
               device: torch.device | str = "cpu", generator: torch.Generator | None = None,
               ) -> tuple[torch.Tensor, ...]:
    """A flat cache of `past` tokens: zeros, or normal noise from `generator` (example inputs, benchmarks)."""
    shape = (batch, kv_heads, past, head_dim)
    if generator is None:
        return tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(2 * num_layers))
    return tuple(torch.randn(shape, generator=generator).to(device, dtype) for _ in range(2 * num_layers))
