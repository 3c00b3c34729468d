"""PyTorch CUDA runtime for CQIL: each group's branches on their own CUDA streams (DESIGN.md section 6).

A group's attentions all read the group input x, so they fork onto one stream per layer at once.
FFN j reads x + a_j + b_j, where the bypass b_j sums the attentions j-d..j-1: it runs on stream j
(after a_j, in stream order) once the events of those earlier attentions have fired. The main
stream joins all branch streams and sums the outputs in layer order, the same order as
`CqilModel.group_forward`, so the result equals the sequential model. Off CUDA (and for one-layer
groups) it simply is the sequential model.

`DecodeStep` captures a batch-1 decode step at a fixed past length in a CUDA graph with static
buffers (one launch per token, which is what makes small decode steps fast); it is for measuring a
step, not a generator: the cache does not grow between replays.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.model.cqil import KV, CqilModel
from pipeline.model.errors import CqilError


class StreamedCqilModel(CqilModel):
    """CqilModel whose groups run their branches concurrently on CUDA streams; sequential elsewhere."""

    def __init__(self, hf_model, plan):
        super().__init__(hf_model, plan)
        self._streams: dict[torch.device, list[torch.cuda.Stream]] = {}

    def branch_streams(self, count: int, device: torch.device) -> list[torch.cuda.Stream]:
        streams = self._streams.setdefault(device, [])
        while len(streams) < count:
            streams.append(torch.cuda.Stream(device))
        return streams[:count]

    def group_forward(self, x: torch.Tensor, group: Sequence[int], rope: tuple[torch.Tensor, torch.Tensor],
                      bias: torch.Tensor, past: Sequence[KV | None]) -> tuple[torch.Tensor, list[KV]]:
        if x.device.type != "cuda" or len(group) == 1:
            return super().group_forward(x, group, rope, bias, past)
        main = torch.cuda.current_stream(x.device)
        streams = self.branch_streams(len(group), x.device)
        attended, attention_done = [], []
        for stream, index, kv in zip(streams, group, past):
            stream.wait_stream(main)  # fork: x, rope, bias and the cache are ready
            with torch.cuda.stream(stream):
                attended.append(self.layer_attention(index, x, rope, bias, kv))
                attention_done.append(torch.cuda.Event())
                attention_done[-1].record(stream)
        outputs = [a for a, _ in attended]
        ffn = []
        for j, (stream, index) in enumerate(zip(streams, group)):
            for k in range(max(0, j - self.plan.bypass), j):
                stream.wait_event(attention_done[k])  # the bypass reads earlier branches' attentions
                outputs[k].record_stream(stream)
            with torch.cuda.stream(stream):
                h = x + outputs[j]
                b = self.bypass(outputs, j)
                if b is not None:
                    h = h + b
                ffn.append(self.layer_ffn(index, h))
        for stream in streams:
            main.wait_stream(stream)  # join
        # Tensors made on a branch stream and used on main: keep the allocator from reusing them early.
        # (Inputs made on main need nothing: main's later work is ordered after the join.)
        for (a, (k, v)), f in zip(attended, ffn):
            for tensor in (a, k, v, f):
                tensor.record_stream(main)
        out = x
        for a, f in zip(outputs, ffn):
            out = out + a + f  # layer order, as in CqilModel.group_forward
        return out, [kv for _, kv in attended]


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
        shape = (1, model.num_kv_heads, past_len, model.head_dim)
        self.past = [torch.randn(shape, generator=generator).to(device, dtype)
                     for _ in range(2 * model.num_layers)]
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
