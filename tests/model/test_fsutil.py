"""fsutil's writes: a file is replaced through a temporary name and a rename, never rewritten in place."""

from __future__ import annotations

import os

import pytest
from cqil.model import fsutil


def test_atomic_write_replaces_the_file_instead_of_writing_into_it(tmp_path):
    target, other_name = tmp_path / "plan.json", tmp_path / "linked.json"
    target.write_text("old")
    os.link(target, other_name)  # a second name of the same file: an in-place write would change it too
    fsutil.atomic_write_text(target, "new")
    assert target.read_text() == "new" and other_name.read_text() == "old"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".plan.json.")]


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "report.md"
    target.write_text("old")

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fsutil.os, "replace", fail)
    with pytest.raises(OSError):
        fsutil.atomic_write_bytes(target, b"new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.md"]
