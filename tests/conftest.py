"""Fixtures shared by the whole suite; the functions they use live in tests/helpers.py."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from tests.helpers import BUILD_THREADS, build_args, tiny_model, tiny_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """Factory: save a tiny checkpoint of `family` once per session and return its directory."""
    made: dict[tuple, Path] = {}

    def make(family: str = "llama", layers: int = 6) -> Path:
        key = (family, layers)
        if key not in made:
            path = tmp_path_factory.mktemp(f"tiny-{family}-{layers}")
            tiny_model(family, layers).save_pretrained(path)
            tokenizer.save_pretrained(path)
            made[key] = path
        return made[key]

    return make


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for a module of tiny matmuls: on the loaded, shared 2-core machine two
    threads fighting make them ~100x slower (measured: 20 ms -> 3-6 s per tiny prefill + decode)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    """An empty, private CQIL cache."""
    monkeypatch.setenv("CQIL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def once_per_run(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """`make(folder)` once per test run, the folder shared by every xdist worker (the first one to ask makes it
    under a file lock, the others wait and read it): the tiny export and build below take 10-30 s each, and
    each worker would otherwise make its own. A folder whose `make` failed is made again by the next one."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the run's folder, above the workers'
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def tiny_cqil_onnx(tmp_path_factory, tiny_model_dir):
    """One `cqil export` of a tiny 4-layer llama under groups 1-3, d=1 (branches): (model dir, onnx dir).

    Shared by the engine tests (runner, validate, bench): a tiny export takes 10-30 s here.
    """
    from cqil.pipeline.cli import main

    def make(folder: Path) -> None:
        shutil.copytree(tiny_model_dir("llama", 4), folder / "model")
        argv = ["export", "--model", str(folder / "model"), "--groups", "1-3", "--bypass", "1"]
        assert main([*argv, "--out", str(folder / "onnx")]) == 0

    folder = once_per_run(tmp_path_factory, "tiny-cqil-onnx", make)
    return folder / "model", folder / "onnx"


@pytest.fixture(scope="session")
def built(tiny_model_dir, tmp_path_factory):
    """(model dir, build dir) of one tiny build; read it, or copy it before changing anything. Built on one
    torch thread, whatever fixture is active when it is first asked for: float sums follow the thread count,
    and tests rebuild in another process (BUILD_THREADS) to compare bytes."""
    from cqil.pipeline.cli import main

    def make(folder: Path) -> None:
        shutil.copytree(tiny_model_dir("llama"), folder / "model")
        threads = torch.get_num_threads()
        torch.set_num_threads(int(BUILD_THREADS["OMP_NUM_THREADS"]))
        try:
            assert main(build_args(folder / "model", folder / "artifacts")) == 0
        finally:
            torch.set_num_threads(threads)

    folder = once_per_run(tmp_path_factory, "built", make)
    return folder / "model", folder / "artifacts"
