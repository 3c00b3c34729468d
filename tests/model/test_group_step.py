"""The group step and its schedule protocol: a recording schedule proves the order of the pieces.

`group_step` is the only place the CQIL math of a group is written; a schedule only decides where and when
each piece runs. A schedule that records every call (and checks that what a piece reads already exists)
shows that a bypass never reads an attention output before it is made, for per-layer and packed pieces.
"""

from __future__ import annotations

import pytest
import torch
from cqil.model.cqil import CqilModel
from cqil.model.group import Sequential, bypass_sources
from cqil.model.plan import Plan, from_parallel_groups

from tests.helpers import tiny_model


class RecordingSchedule(Sequential):
    """Sequential, logging (group, lane, role, reads) and checking each bypass read against what exists."""

    def __init__(self):
        self.log: list[tuple[int, tuple[int, ...], str, tuple[int, ...]]] = []
        self.made: set[tuple[int, int]] = set()

    def call(self, group, lane, role, fn, *args, reads=()):
        self.log.append((group, tuple(lane), role, tuple(reads)))
        if role == "bypass":
            missing = [k for k in reads if (group, k) not in self.made]
            assert not missing, f"group {group} lane {lane}: bypass reads attention {missing} before it exists"
        result = fn(*args)
        if role == "attn":
            self.made |= {(group, j) for j in lane}
        return result


def _plan(layers: int, bypass: int) -> Plan:
    return from_parallel_groups([[1, 2, 3], [4, 5]], layers, bypass)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("bypass", [0, 1, 2])
def test_recorded_order_of_pieces(packed, bypass):
    hf = tiny_model("qwen2", layers=7)
    plan = _plan(7, bypass)
    schedule = RecordingSchedule()
    model = CqilModel(hf, plan, schedule=schedule, packed=packed)
    ids = torch.randint(3, 300, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, _ = model(ids)
        want, _ = CqilModel(hf, plan)(ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for index, group in enumerate(plan.groups):
        entries = [entry for entry in schedule.log if entry[0] == index]
        lanes = [[j] for j in range(len(group))] if not packed or len(group) == 1 else [list(range(len(group)))]
        expected_roles = []
        for lane in lanes:
            expected_roles.append((tuple(lane), "attn"))
        for lane in lanes:
            expected_roles.append((tuple(lane), "residual"))
            if any(bypass_sources(j, bypass) for j in lane):
                expected_roles.append((tuple(lane), "bypass"))
            expected_roles.append((tuple(lane), "ffn"))
        assert [(lane, role) for _, lane, role, _ in entries] == expected_roles
        for _, lane, role, reads in entries:
            # a lane declares exactly the positions outside it whose attention its bypass reads
            want_reads = sorted({k for j in lane for k in bypass_sources(j, bypass)} - set(lane))
            assert list(reads) == (want_reads if role == "bypass" else [])


def test_a_schedule_that_runs_the_bypass_too_early_is_caught():
    """The recording check itself can fail: a schedule that reorders a bypass before the attention it reads."""

    class Reordering(RecordingSchedule):
        def call(self, group, lane, role, fn, *args, reads=()):
            if role == "attn" and lane != [0]:
                self.made.discard((group, lane[0]))
                result = super().call(group, lane, role, fn, *args, reads=reads)
                self.made.discard((group, lane[0]))  # pretend it is still running elsewhere
                return result
            return super().call(group, lane, role, fn, *args, reads=reads)

    model = CqilModel(tiny_model("llama", layers=7), _plan(7, 2), schedule=Reordering())
    with pytest.raises(AssertionError, match="before it exists"), torch.no_grad():
        model(torch.tensor([[5, 6, 7]]))
