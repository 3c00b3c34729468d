"""CQIL on CUDA streams: a schedule of the group step with one stream per branch (DESIGN.md section 3).

A group's attentions all read the group input x, so each lane forks onto its own stream at once. FFN j
reads x + a_j + b_j, where the bypass b_j sums the attentions j-d..j-1: its stream waits for the events
recorded after those attentions. The combine joins every branch stream back into the current stream and
sums in layer order, exactly as the sequential schedule does, so the result is the same and the step can
be captured in a CUDA graph. Groups of one lane run on the current stream.

`DecodeStep` captures a batch-1 decode step at a fixed past length in a CUDA graph with static buffers
(one launch per token, which is what makes small decode steps fast); it is for measuring a step, not a
generator: the cache does not grow between replays.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from cqil.model.cqil import CqilModel
from cqil.model.errors import CqilError
from cqil.model.group import fold_terms
from cqil.model.kv import make_cache


class StreamBackend(Protocol):
    """The few stream operations the schedule uses; `CudaBackend` in use, a recorder in the tests."""

    def current_stream(self) -> Any: ...
    def new_stream(self) -> Any: ...
    def new_event(self) -> Any: ...
    def on(self, stream: Any) -> contextlib.AbstractContextManager: ...
    def keep_alive(self, tensor: torch.Tensor, stream: Any) -> None: ...


class CudaBackend:
    """torch.cuda streams and events on one device."""

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())

    def current_stream(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def new_stream(self) -> torch.cuda.Stream:
        return torch.cuda.Stream(self.device)

    def new_event(self) -> torch.cuda.Event:
        return torch.cuda.Event()

    def on(self, stream: torch.cuda.Stream) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(stream)

    def keep_alive(self, tensor: torch.Tensor, stream: torch.cuda.Stream) -> None:
        """Tell the caching allocator that `stream` uses a tensor made on another stream."""
        tensor.record_stream(stream)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


class StreamSchedule:
    """Each lane of a group on its own stream; events order the bypass reads; joined at the combine."""

    def __init__(self, backend: StreamBackend | None = None):
        self.backend = backend or CudaBackend()
        self._streams: list[Any] = []
        self._forked: set[int] = set()
        self._attention_done: dict[tuple[int, int], Any] = {}
        self._attention_outputs: dict[tuple[int, int], torch.Tensor] = {}
        self._branch_results: dict[int, list[torch.Tensor]] = {}

    def _stream(self, position: int) -> Any:
        while len(self._streams) <= position:
            self._streams.append(self.backend.new_stream())
        return self._streams[position]

    def lanes(self, group: int, lanes: list[list[int]]) -> list[list[int]]:
        if len(lanes) > 1:
            self._forked.add(group)
            self._branch_results[group] = []
        return lanes

    def call(self, group: int, lane: list[int], role: str, fn: Callable[..., Any], *args: Any,
             reads: tuple[int, ...] = ()) -> Any:
        if group not in self._forked:
            return fn(*args)
        stream = self._stream(lane[0])
        if role == "attn":
            stream.wait_stream(self.backend.current_stream())  # fork: x, rope, mask and the cache are ready
        for position in reads:  # the bypass reads earlier branches' attention outputs
            stream.wait_event(self._attention_done[(group, position)])
            self.backend.keep_alive(self._attention_outputs[(group, position)], stream)
        with self.backend.on(stream):
            result = fn(*args)
        if role == "attn":
            event = self.backend.new_event()
            event.record(stream)
            for position, output in zip(lane, result[0]):
                self._attention_done[(group, position)] = event
                self._attention_outputs[(group, position)] = output
        if role in ("attn", "ffn"):
            self._branch_results[group].extend(_tensors(result))
        return result

    def share(self, group: int, attention: dict[int, torch.Tensor], needed: set[int]) -> dict[int, torch.Tensor]:
        return attention

    def combine(self, group: int, x: torch.Tensor, terms: list[tuple[list[torch.Tensor], torch.Tensor]]) -> torch.Tensor:
        if group in self._forked:
            main = self.backend.current_stream()
            for stream in self._streams:
                main.wait_stream(stream)  # join every branch before the sum and the next group
            # Tensors made on a branch stream and used on the current one (terms, presents): keep the allocator
            # from reusing their memory early. Inputs made on the current stream need nothing.
            for tensor in self._branch_results.pop(group):
                self.backend.keep_alive(tensor, main)
            self._forked.discard(group)
            for key in [key for key in self._attention_done if key[0] == group]:
                del self._attention_done[key], self._attention_outputs[key]
        return fold_terms(x, terms)


class DecodeStep:
    """One batch-1 decode step at a fixed past length over static buffers; a CUDA graph on CUDA.

    `step(token)` writes the token into the static input and replays the graph (or, off CUDA, runs
    the model eagerly on the same buffers) and returns the logits [1, 1, vocab] (a static buffer:
    copy it to keep it).
    """

    def __init__(self, model: CqilModel, past_len: int, device: torch.device | str, dtype: torch.dtype,
                 use_graph: bool = True, warmup: int = 3, seed: int = 0):
        device = torch.device(device)
        if past_len < 1:
            raise CqilError(f"decode past length {past_len} must be at least 1")
        self.model = model
        generator = torch.Generator().manual_seed(seed)
        self.past = make_cache(model.num_layers, 1, model.num_kv_heads, past_len, model.head_dim, dtype, device,
                               generator)
        self.input_ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.attention_mask = torch.ones(1, past_len + 1, dtype=torch.long, device=device)
        self.position_ids = torch.full((1, 1), past_len, dtype=torch.long, device=device)
        self.graph = None
        if use_graph and device.type == "cuda":
            self._capture(warmup)

    def _run(self) -> torch.Tensor:
        logits, _ = self.model(self.input_ids, self.attention_mask, self.position_ids, self.past)
        return logits

    @torch.no_grad()
    def _capture(self, warmup: int) -> None:
        side = torch.cuda.Stream(self.input_ids.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up off the default stream, as graph capture requires
            for _ in range(warmup):
                self._run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._run()

    @torch.no_grad()
    def __call__(self, token: int | torch.Tensor = 0) -> torch.Tensor:
        if isinstance(token, int):
            self.input_ids.fill_(token)
        else:
            self.input_ids.copy_(token)
        if self.graph is None:
            return self._run()
        self.graph.replay()
        return self.logits
