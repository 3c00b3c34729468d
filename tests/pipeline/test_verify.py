"""`cqil verify` against manifest.json on a real tiny build: every kind of damage is one line, exit 1;
a broken manifest is exit 2; the hidden `.stage.json` records are never trusted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cqil.pipeline.cli import main

from tests.helpers import build_args

ONNX = "export/onnx/model.onnx"


@pytest.fixture
def copy(built, tmp_path) -> Path:
    return Path(shutil.copytree(built[1], tmp_path / "copy", symlinks=True))


def verify(build: Path, capsys, *extra: str) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(["verify", str(build), *extra])
    captured = capsys.readouterr()
    return code, (captured.out + captured.err).splitlines()


def flip_one_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_an_untouched_build_verifies_and_json_lists_nothing(built, capsys):
    _, out = built
    manifest = json.loads((out / "manifest.json").read_text())
    recorded = len(manifest["files"]) + sum(len(s["files"]) for s in manifest["stages"].values())
    assert set(manifest["files"]) == {"build.toml", "report.md"}
    code, lines = verify(out, capsys)
    assert code == 0 and lines == [f"{out}: OK, all {recorded} files recorded in manifest.json match their sha256 and size"]
    code, lines = verify(out, capsys, "--json")
    assert code == 0 and json.loads("\n".join(lines)) == {"build": str(out), "ok": True, "files_checked": recorded,
                                                          "problems": []}


@pytest.mark.parametrize("damage, expected", [
    (lambda b: (b / ONNX).unlink(), [f"{ONNX}: missing"]),
    (lambda b: shutil.rmtree(b / "export"), ["export/: missing"]),
    (lambda b: (b / ONNX).write_bytes((b / ONNX).read_bytes()[:-1]), [f"{ONNX}: changed"]),
    (lambda b: flip_one_bit(b / ONNX, 1000), [f"{ONNX}: changed (sha256"]),
    (lambda b: flip_one_bit(b / "report.md", 0), ["report.md: changed (sha256"]),
    (lambda b: (b / "plan" / "notes.txt").write_text("mine"), ["plan/notes.txt: unrecorded"]),
    (lambda b: (b / "stray.bin").write_bytes(b"\0"), ["stray.bin: unrecorded"]),
    (lambda b: (b / ONNX).rename(b / "export/onnx/model2.onnx"),
     [f"{ONNX}: missing", "export/onnx/model2.onnx: unrecorded"]),
    (lambda b: (b / "validate").rename(b / "validated"),
     ["validate/: missing", "validated/quality.json: unrecorded", "validated/validation.json: unrecorded"]),
], ids=["delete", "delete-stage", "truncate", "bit-flip", "bit-flip-top", "add-in-stage", "add-on-top",
        "rename", "rename-stage"])
def test_each_damage_is_one_line_and_exit_1(copy, capsys, damage, expected):
    damage(copy)
    code, lines = verify(copy, capsys)
    problems, summary = lines[:-1], lines[-1]
    assert code == 1 and summary == f"{copy}: {len(expected)} mismatch(es) with manifest.json"
    assert len(problems) == len(expected) and all(line.startswith(e) for line, e in zip(sorted(problems), sorted(expected)))
    code, lines = verify(copy, capsys, "--json")
    report = json.loads("\n".join(lines))
    assert code == 1 and report["ok"] is False and len(report["problems"]) == len(expected)


def test_the_stage_records_are_not_the_authority(copy, capsys):
    """Deleting or emptying the hidden records changes nothing; with them gone, damage is still found."""
    (copy / "plan" / ".stage.json").write_text("{}")
    (copy / "export" / ".stage.json").unlink()
    assert verify(copy, capsys)[0] == 0
    flip_one_bit(copy / ONNX, 2000)
    code, lines = verify(copy, capsys)
    assert code == 1 and lines[0].startswith(f"{ONNX}: changed")


def test_a_copy_without_hidden_files_verifies_and_still_catches_junk(built, tmp_path, capsys):
    bare = Path(shutil.copytree(built[1], tmp_path / "bare", ignore=shutil.ignore_patterns(".*")))
    assert not list(bare.rglob(".stage.json"))
    assert verify(bare, capsys)[0] == 0
    (bare / ONNX).write_text("junk")
    code, lines = verify(bare, capsys)
    assert code == 1 and lines[:-1] == [f"{ONNX}: changed (4 bytes, recorded {(built[1] / ONNX).stat().st_size})"]


def _manifest(build: Path) -> dict:
    return json.loads((build / "manifest.json").read_text())


@pytest.mark.parametrize("manifest, message", [
    (None, "no manifest.json"),
    (b"{ not json", "is not JSON"),
    (b"\xff\xfe", "is not JSON"),
    (b"[]", "not a JSON object"),
    (lambda m: {**m, "format": "cqil-manifest/1"}, "format 'cqil-manifest/1'"),
    (lambda m: {k: v for k, v in m.items() if k != "stages"}, "'stages' must be"),
    (lambda m: {**m, "stages": {"../up": {"files": {}}}}, "is not a folder name"),
    (lambda m: {**m, "files": {"../../etc/passwd": m["files"]["report.md"]}}, "not a relative path inside"),
    (lambda m: {**m, "files": {"report.md": {"sha256": "abc", "size": 1}}}, "needs a sha256"),
    (lambda m: {**m, "stages": {**m["stages"], "plan": {"files": ["plan.json"]}}}, "'files' must be an object"),
], ids=["missing", "garbage", "not-utf8", "list", "old-format", "no-stages", "stage-escapes", "file-escapes",
        "bad-sha", "files-list"])
def test_a_missing_or_malformed_manifest_is_exit_2_in_one_line(copy, capsys, manifest, message):
    path = copy / "manifest.json"
    if manifest is None:
        path.unlink()
    elif isinstance(manifest, bytes):
        path.write_bytes(manifest)
    else:
        path.write_text(json.dumps(manifest(_manifest(copy))))
    code, lines = verify(copy, capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("cqil verify: error:") and message in lines[0]


def test_an_empty_stage_record_reruns_that_stage_and_the_build_verifies(built, copy, capsys):
    model, _ = built
    (copy / "package" / ".stage.json").write_text("{}")
    (copy / "engines" / "trt" / "engine_settings.json").write_text("{}")  # edited output: the stage reruns
    capsys.readouterr()
    assert main(build_args(model, copy)) == 0
    err = capsys.readouterr().err
    assert {name for name in ("engines", "package", "export", "merge") if f"[{name}] running" in err} == \
        {"engines", "package"}
    assert verify(copy, capsys)[0] == 0
