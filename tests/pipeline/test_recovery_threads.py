"""Recovery on a busy machine: each step runs on the cores other processes leave free."""

from __future__ import annotations

import os

import pytest
import torch
from cqil.model.plan import uniform_plan
from cqil.pipeline.data import load_split
from cqil.pipeline.recovery import FinetuneSettings, finetune

from tests.helpers import cpu_hogs, tiny_model


@pytest.fixture
def torch_threads():
    """Recovery starting with as many threads as cores (at least 2), given back afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, len(os.sched_getaffinity(0))))
    yield
    torch.set_num_threads(threads)


def short_recovery(tokenizer, tmp_path) -> dict:
    split = load_split(tokenizer, None, None, 16)
    settings = FinetuneSettings(steps=3, lr=1e-3, batch_size=2, rank=4, eval_every=0, eval_chunks=2, save_every=0)
    return finetune(tiny_model("llama", 4), uniform_plan(1, 3, 2, 4), split.train, split.held_out, settings,
                    tmp_path / "adapter", progress=False)


def test_recovery_steps_on_the_free_core_and_gives_the_threads_back(tokenizer, tmp_path, torch_threads,
                                                                    monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    started_with = torch.get_num_threads()
    with cpu_hogs(len(os.sched_getaffinity(0)) - 1):
        record = short_recovery(tokenizer, tmp_path)
    assert record["threads_per_step"] == [1, 1, 1]
    assert torch.get_num_threads() == started_with


def test_a_users_omp_num_threads_is_kept(tokenizer, tmp_path, torch_threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    with cpu_hogs(len(os.sched_getaffinity(0)) - 1):
        record = short_recovery(tokenizer, tmp_path)
    assert record["threads_per_step"] == [torch.get_num_threads()] * 3
