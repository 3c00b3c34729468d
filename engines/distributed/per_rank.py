"""CQIL across P ranks (DESIGN.md section 8): rank r runs the r-th layer of every group.

Placement: a group of q > 1 layers puts its position r on rank r (ranks r >= q add nothing to that
group's combine). Layers outside groups (singleton groups), the embeddings, the final norm and the
head are replicated: every rank computes them from the same input, so they cost no communication
and no rank waits on another for them (docs/distributed.md says why this beats rank 0 + broadcast).

Per parallel group on rank r: a_r = Attn(InNorm(x)); the bypass b_r needs a_{r-d}..a_{r-1}, so when
d > 0 the attention outputs are all-gathered; f_r = MLP(PostNorm(x + a_r + b_r)); the combine
out = x + sum_j (a_j + f_j) is one all-reduce of (a_r + f_r). Each rank keeps the KV cache of its own
layers only (None for the others in the flat cache) and loads only the weights it runs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.model.cqil import CqilModel, attention_bias, positions_from_mask
from pipeline.model.errors import CqilError
from pipeline.model.plan import Plan

LAYER_PREFIX = "model.layers."


@dataclass(frozen=True)
class Placement:
    """Which layers rank `rank` of `world` runs under `plan`."""

    plan: Plan
    rank: int
    world: int

    def __post_init__(self) -> None:
        check_world_fits(self.plan, self.world)

    def position(self, group: Sequence[int]) -> int | None:
        """This rank's position in a parallel group, or None when the group is shorter than the rank."""
        return self.rank if self.rank < len(group) else None

    @property
    def layers(self) -> list[int]:
        """The layers this rank holds: every singleton, and its own position of each parallel group."""
        held = []
        for group in self.plan.groups:
            if len(group) == 1:
                held.append(group[0])
            elif self.rank < len(group):
                held.append(group[self.rank])
        return held


def check_world_fits(plan: Plan, world: int) -> None:
    """P ranks run a plan whose largest group has exactly P layers; anything else is refused."""
    if plan.is_identity:
        raise CqilError("the plan has no parallel groups, so there is nothing to spread over ranks: "
                        "pass a plan with groups (e.g. --uniform 15:30:2) or run one process")
    if world != plan.max_group_size:
        raise CqilError(f"{world} rank(s) do not fit the plan: rank r runs the r-th layer of each group and "
                        f"the largest group has {plan.max_group_size} layers: use --ranks {plan.max_group_size}")


class AbsentLayer(nn.Module):
    """Stands in for a decoder layer another rank holds: no weights, and calling it is a bug."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"decoder layer {self.index} is held by another rank")


def drop_layers(hf_model: nn.Module, keep: Iterable[int]) -> nn.Module:
    """Replace every decoder layer not in `keep` by an AbsentLayer (frees its weights)."""
    keep = set(keep)
    layers = hf_model.model.layers
    for index in range(len(layers)):
        if index not in keep:
            layers[index] = AbsentLayer(index)
    return hf_model


def load_rank_model(path: Path, placement: Placement, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The HF model with only this rank's weights read from disk (safetensors), in eval mode.

    The model is built on the meta device, the layers of other ranks are dropped, and only the
    remaining tensors are read, so a rank never holds the whole model. A checkpoint in .bin form is
    loaded whole and then trimmed (torch cannot read part of a pickle).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return drop_layers(model, placement.layers).eval()
    config = AutoConfig.from_pretrained(path)
    placement.plan.check_fits(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    drop_layers(model, placement.layers)
    wanted = set(model.state_dict())
    state = _read_tensors(files, wanted, dtype)
    missing = wanted - set(state)
    if config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise CqilError(f"'{path}' lacks weights {sorted(missing)[:3]}...: the checkpoint is incomplete")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Non-persistent buffers (rotary inverse frequencies) were made on the meta device: rebuild them.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model.eval()


def _read_tensors(files: list[Path], wanted: set[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    index = {}
    index_file = files[0].parent / "model.safetensors.index.json"
    if index_file.is_file():
        index = json.loads(index_file.read_text()).get("weight_map", {})
    state = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key in wanted and index.get(key, file.name) == file.name:
                    state[key] = handle.get_tensor(key).to(dtype)
    return state


def parameter_count(module: nn.Module) -> int:
    """Parameters held, each shared tensor counted once (tied embeddings)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


class RankModel(nn.Module):
    """This rank's share of a CQIL model; called like CqilModel on every rank with the same inputs.

    Returns the full logits on every rank (the last all-reduce leaves every rank the same residual
    stream) and this rank's presents, flat (k0, v0, ...) with None for layers held elsewhere.
    """

    def __init__(self, hf_model: nn.Module, placement: Placement, group=None):
        super().__init__()
        self.cqil = CqilModel(hf_model, placement.plan)
        self.placement = placement
        self.process_group = group

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                past_key_values: Sequence[torch.Tensor | None] | None = None,
                ) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
        cqil = self.cqil
        batch, seq = input_ids.shape
        past_len = next((t.shape[2] for t in past_key_values or () if t is not None), 0)
        if attention_mask is None:
            attention_mask = torch.ones(batch, past_len + seq, dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, seq)
        x = cqil.hf.model.embed_tokens(input_ids)
        rope = cqil.hf.model.rotary_emb(x, position_ids)
        bias = attention_bias(attention_mask, seq, x.dtype, cqil.sliding_window)
        presents: list[torch.Tensor | None] = [None] * (2 * cqil.num_layers)
        for group in cqil.plan.groups:
            past = [(past_key_values[2 * i], past_key_values[2 * i + 1]) if past_key_values else None
                    for i in group]
            if len(group) == 1:
                x, ((k, v),) = cqil.group_forward(x, group, rope, bias, past)
                presents[2 * group[0]:2 * group[0] + 2] = [k, v]
                continue
            x, kv = self._parallel_group(x, group, rope, bias, past)
            if kv is not None:
                layer = group[self.placement.rank]
                presents[2 * layer:2 * layer + 2] = list(kv)
        logits = cqil.hf.lm_head(cqil.hf.model.norm(x))
        return logits, tuple(presents)

    def _parallel_group(self, x, group, rope, bias, past):
        """x + all_reduce(a_r + f_r): this rank's layer of the group, one all-reduce for the combine."""
        import torch.distributed as dist

        cqil, position = self.cqil, self.placement.position(group)
        term, kv = torch.zeros_like(x), None
        attention = None
        if position is not None:
            attention, kv = cqil.layer_attention(group[position], x, rope, bias, past[position])
        if cqil.plan.bypass > 0:
            gathered = [torch.empty_like(x) for _ in range(self.placement.world)]
            dist.all_gather(gathered, attention if attention is not None else term, group=self.process_group)
            bypass = cqil.bypass(gathered[:len(group)], position) if position is not None else None
        else:
            bypass = None
        if position is not None:
            h = x + attention
            if bypass is not None:
                h = h + bypass
            term = attention + cqil.layer_ffn(group[position], h)
        dist.all_reduce(term, group=self.process_group)
        return x + term, kv


class AgreedTokens:
    """Wraps a rank model for greedy decoding: the last position's logits come from rank 0 on every rank,
    so all ranks pick the same token and stop at the same step even if their logits differ in the last bit."""

    def __init__(self, model: nn.Module, group=None):
        self.model = model
        self.process_group = group

    def __call__(self, *args, **kwargs):
        import torch.distributed as dist

        logits, presents = self.model(*args, **kwargs)
        last = logits[:, -1:].contiguous()
        dist.broadcast(last, src=0, group=self.process_group)
        return last, presents
