"""Weights follow the umask like every other output: every writer of safetensors files (finetune's
adapter, merge, the build's recover and merge stages, the GGUF conversion, all through fsutil.atomic_dir)
under umask 077, 027 and 002."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from cqil.model.fsutil import atomic_dir
from cqil.pipeline.cli import main
from safetensors.torch import save_file

UMASKS = (0o077, 0o027, 0o002)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def under_umask(umask: int, argv: list[str]) -> int:
    old = os.umask(umask)
    try:
        return main(argv)
    finally:
        os.umask(old)


@pytest.mark.parametrize("umask", UMASKS, ids=[f"{u:03o}" for u in UMASKS])
def test_a_safetensors_file_written_in_an_atomic_dir_follows_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "weights") as tmp:
            save_file({"w": torch.zeros(2)}, tmp / "model.safetensors")  # safetensors itself writes 0600
            (tmp / "config.json").write_text("{}")
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json", ".cqil-output"):
        assert mode(tmp_path / "weights" / name) == 0o666 & ~umask, name
    assert mode(tmp_path / "weights") == 0o777 & ~umask


def test_a_hard_linked_file_keeps_its_own_mode(tmp_path):
    private = tmp_path / "users-model.safetensors"
    private.write_bytes(b"x")
    private.chmod(0o600)
    with atomic_dir(tmp_path / "out") as tmp:
        os.link(private, tmp / "model.safetensors")
    assert mode(private) == 0o600


@pytest.mark.parametrize("umask", UMASKS, ids=[f"{u:03o}" for u in UMASKS])
def test_finetune_and_merge_write_weights_under_the_umask(tiny_model_dir, tmp_path, umask, capsys):
    model = str(tiny_model_dir("llama", 2))
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    assert under_umask(umask, ["finetune", "--model", model, "--uniform", "0:2:2", "--steps", "1", "--seq-len", "16",
                               "--max-chunks", "4", "--eval-chunks", "1", "--rank", "2", "--out", str(adapter)]) == 0
    assert under_umask(umask, ["merge", "--model", model, "--adapter", str(adapter), "--out", str(merged)]) == 0
    for path in (adapter / "adapter_model.safetensors", adapter / "adapter_config.json",
                 merged / "model.safetensors", merged / "config.json"):
        assert mode(path) == 0o666 & ~umask, path


def test_the_builds_weights_are_readable_like_its_other_files(built):
    _, out = built  # built under the test run's umask
    expected = 0o666 & ~(lambda u: (os.umask(u), u)[1])(os.umask(0))
    for path in (out / "recover" / "adapter" / "adapter_model.safetensors", out / "merge" / "model" / "model.safetensors",
                 out / "merge" / "model" / "config.json"):
        assert mode(path) == expected, path
