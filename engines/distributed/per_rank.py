"""CQIL across P ranks (DESIGN.md section 8): rank r runs the r-th layer of every group.

Placement: a group of q > 1 layers puts its position r on rank r (ranks r >= q add nothing to that
group's combine). Layers outside groups (singleton groups), the embeddings, the final norm and the
head are replicated: every rank computes them from the same input, so they cost no communication
and no rank waits on another for them (docs/distributed.md says why this beats rank 0 + broadcast).

The math is the group step's (model/group.py); `RankSchedule` only says where it runs. Per
parallel group on rank r: a_r = Attn(InNorm(x)); b_r needs a_{r-d}..a_{r-1}, sent point to point by
ranks r-d..r-1; f_r = MLP(PostNorm(x + a_r + b_r)); the combine out = x + sum_j (a_j + f_j) is one
all-reduce of (a_r + f_r). Each rank keeps the KV cache of its own layers only (None for the others
in the flat cache) and loads only the weights it runs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from cqil.model.cqil import CqilModel
from cqil.model.errors import CqilError
from cqil.model.group import fold_terms
from cqil.model.plan import Plan
from torch import nn


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
    if plan.max_group_size == 1:
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
            for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                if key in wanted and index.get(key, file.name) == file.name:
                    state[key] = handle.get_tensor(key).to(dtype)
    return state


def parameter_count(module: nn.Module) -> int:
    """Parameters held, each shared tensor counted once (tied embeddings)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


class RankSchedule:
    """The group step (model/group.py) with rank r running position r of each parallel group.

    Singleton groups run whole on every rank (replicated). In a parallel group, the bypass reaches
    rank k as point-to-point messages from ranks k-d..k-1 (each sender knows its readers from the
    plan, so a rank with no layer in the group neither sends nor receives), and the combine is one
    all-reduce of this rank's a_r + f_r (zeros on a rank with no layer there).
    """

    def __init__(self, placement: Placement, process_group=None):
        self.placement = placement
        self.process_group = process_group

    def _parallel(self, group: int) -> bool:
        return len(self.placement.plan.groups[group]) > 1

    def lanes(self, group: int, lanes: list[list[int]]) -> list[list[int]]:
        if not self._parallel(group):
            return lanes
        position = self.placement.position(self.placement.plan.groups[group])
        return [] if position is None else [lanes[position]]

    def call(self, group: int, lane: list[int], role: str, fn, *args, reads: tuple[int, ...] = ()):
        return fn(*args)

    def share(self, group: int, attention: dict[int, torch.Tensor], needed: set[int]) -> dict[int, torch.Tensor]:
        import torch.distributed as dist

        if not self._parallel(group) or not attention:
            return attention
        size, bypass = len(self.placement.plan.groups[group]), self.placement.plan.bypass
        (mine, output), = attention.items()
        ops = [dist.P2POp(dist.isend, output.contiguous(), self._global(k), self.process_group)
               for k in range(mine + 1, min(mine + bypass + 1, size))]
        received = {k: torch.empty_like(output) for k in sorted(needed)}
        ops += [dist.P2POp(dist.irecv, tensor, self._global(k), self.process_group) for k, tensor in received.items()]
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        return {**attention, **received}

    def _global(self, rank: int) -> int:
        import torch.distributed as dist

        return rank if self.process_group is None else dist.get_global_rank(self.process_group, rank)

    def combine(self, group: int, x: torch.Tensor, terms: list[tuple[list[torch.Tensor], torch.Tensor]]) -> torch.Tensor:
        import torch.distributed as dist

        if not self._parallel(group):
            return fold_terms(x, terms)
        local = fold_terms(torch.zeros_like(x), terms)
        dist.all_reduce(local, group=self.process_group)
        return x + local


def rank_model(hf_model: nn.Module, placement: Placement, process_group=None) -> CqilModel:
    """This rank's share of a CQIL model, called like CqilModel on every rank with the same inputs.

    Returns the full logits on every rank (the last all-reduce leaves every rank the same residual
    stream) and this rank's presents, flat (k0, v0, ...) with None for layers held elsewhere.
    """
    return CqilModel(hf_model, placement.plan, schedule=RankSchedule(placement, process_group))


class AgreedTokens:
    """Wraps a rank model for greedy decoding: the last position's logits come from rank 0 on every rank,
    so all ranks pick the same token and stop at the same step even if their logits differ in the last bit.

    Inputs go to `device` and the logits come back on the CPU, so the decoding loop stays on the CPU
    whatever device the rank computes on.
    """

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu", group=None):
        self.model = model
        self.device = torch.device(device)
        self.process_group = group

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past_key_values=None):
        import torch.distributed as dist

        logits, presents = self.model(input_ids.to(self.device), attention_mask.to(self.device),
                                      past_key_values=past_key_values)
        last = logits[:, -1:].contiguous()
        dist.broadcast(last, src=0, group=self.process_group)
        return last.cpu(), presents
