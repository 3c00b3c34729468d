"""`manifest.json`: the record of a build, and `cqil verify`'s check of a build directory against it.

The manifest names every stage with its key, wall time and metrics, and every file the build wrote
(each stage's files and the top-level `build.toml` and `report.md`) with its sha256 and size. It is the
only authority `cqil verify` trusts: the hidden per-stage `.stage.json` records are the stage runner's
cache and are never read by verify. Hidden files (markers, records, the lock, recovery checkpoints) are
cqil's bookkeeping, not artifacts: they are neither recorded nor checked, so a copy of a build made
without dotfiles (as artifact uploaders often make it) verifies like the original.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from cqil.model.errors import CqilError
from cqil.model.fsutil import atomic_write_text, sha256_file
from cqil.model.version import __version__
from cqil.pipeline.stages import StageResult, file_entries, is_hidden

FORMAT = "cqil-manifest/2"
NAME = "manifest.json"
TOP_FILES = ("build.toml", "report.md")  # written before the manifest, recorded in it

LIBRARIES = ("torch", "transformers", "peft", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu",
             "tensorrt", "polygraphy")


def library_versions() -> dict[str, str]:
    """Installed versions; 'not installed' says plainly what a stage could not use."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def manifest(build_dir: Path, results: list[StageResult]) -> dict[str, Any]:
    top = file_entries(build_dir, only=TOP_FILES)
    return {
        "format": FORMAT,
        "tool": f"cqil-pipeline {__version__}",
        "versions": library_versions(),
        "files": top,
        "stages": {
            r.name: {"status": r.status, "key": r.record["key"], "seconds": r.record["seconds"],
                     "metrics": r.record["metrics"], "files": r.record["files"]}
            for r in results
        },
    }


def write_manifest(build_dir: Path, results: list[StageResult]) -> Path:
    path = Path(build_dir) / NAME
    atomic_write_text(path, json.dumps(manifest(build_dir, results), indent=2) + "\n")
    return path


# -- verify ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Problem:
    path: str  # relative to the build directory; a stage folder ends with "/"
    kind: str  # "missing" | "changed" | "unrecorded"
    detail: str = ""

    def line(self) -> str:
        return f"{self.path}: {self.kind}{f' ({self.detail})' if self.detail else ''}"


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _safe_relative(name: Any) -> bool:
    """A path inside the build: relative, no '..', no empty or hidden part (verify never reads outside)."""
    if not isinstance(name, str) or not name or "\\" in name:
        return False
    parts = PurePosixPath(name).parts
    return not PurePosixPath(name).is_absolute() and all(p not in ("", ".", "..") and not p.startswith(".")
                                                         for p in parts)


def _check_files(files: Any, where: str) -> dict[str, dict[str, Any]]:
    if not isinstance(files, dict):
        raise ValueError(f"{where}: 'files' must be an object of path -> {{sha256, size}}")
    for name, entry in files.items():
        if not _safe_relative(name):
            raise ValueError(f"{where}: file name {name!r} is not a relative path inside the build")
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"])
                and type(entry.get("size")) is int and entry["size"] >= 0):
            raise ValueError(f"{where}: '{name}' needs a sha256 (64 hex digits) and a size (bytes)")
    return files


def load_manifest(build_dir: Path) -> dict[str, Any]:
    """The manifest of `build_dir`, checked for shape; a CqilError (exit 2) when missing, not JSON or malformed."""
    path = Path(build_dir) / NAME
    if not path.is_file():
        raise CqilError(f"'{build_dir}' is not a cqil build (no {NAME}): pass the --out of `cqil build`")
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CqilError(f"'{path}' is not JSON ({exc}): rebuild with `cqil build --out {build_dir}`") from None
    try:
        if not isinstance(data, dict):
            raise ValueError("it is not a JSON object")
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT!r}")
        _check_files(data.get("files"), "top level")
        stages = data.get("stages")
        if not isinstance(stages, dict) or not stages:
            raise ValueError("'stages' must be a non-empty object of stage -> {key, files, ...}")
        for name, entry in stages.items():
            if not _safe_relative(name) or "/" in name:
                raise ValueError(f"stage name {name!r} is not a folder name")
            if not isinstance(entry, dict):
                raise ValueError(f"stage '{name}' must be an object")
            _check_files(entry.get("files"), f"stage '{name}'")
    except ValueError as exc:
        raise CqilError(f"'{path}' is not a cqil build manifest: {exc}; rebuild with `cqil build --out {build_dir}`") \
            from None
    return data


def _present_files(build_dir: Path) -> set[str]:
    """Every visible file under `build_dir`, relative, as '/'-joined paths (hidden parts skipped)."""
    found = set()
    for path in build_dir.rglob("*"):
        relative = path.relative_to(build_dir)
        if not any(is_hidden(part) for part in relative.parts) and path.is_file():
            found.add(relative.as_posix())
    return found


def verify(build_dir: Path) -> tuple[list[Problem], int]:
    """Every mismatch between `build_dir` and its manifest, and how many recorded files were checked."""
    build_dir = Path(build_dir)
    data = load_manifest(build_dir)
    recorded: dict[str, dict[str, Any]] = dict(data["files"])
    problems: list[Problem] = []
    for stage, entry in data["stages"].items():
        if not (build_dir / stage).is_dir():
            problems.append(Problem(f"{stage}/", "missing", f"stage folder; {len(entry['files'])} recorded files"))
            continue
        recorded.update({f"{stage}/{name}": value for name, value in entry["files"].items()})
    present = _present_files(build_dir)
    for name, entry in sorted(recorded.items()):
        path = build_dir / name
        if name not in present:
            problems.append(Problem(name, "missing"))
            continue
        size = path.stat().st_size
        if size != entry["size"]:
            problems.append(Problem(name, "changed", f"{size} bytes, recorded {entry['size']}"))
            continue
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            problems.append(Problem(name, "changed", f"sha256 {digest[:12]}…, recorded {entry['sha256'][:12]}…"))
    problems += [Problem(name, "unrecorded", f"not in {NAME}") for name in sorted(present - set(recorded) - {NAME})]
    return problems, len(recorded)
