"""`manifest.json` of a build: per stage its key, files with sha256, wall time, metrics; library versions."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any

from cqil.model.version import __version__
from cqil.pipeline.stages import StageResult

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


def manifest(results: list[StageResult]) -> dict[str, Any]:
    return {
        "format": "cqil-manifest/1",
        "tool": f"cqil-pipeline {__version__}",
        "versions": library_versions(),
        "stages": {
            r.name: {"status": r.status, "key": r.record["key"], "seconds": r.record["seconds"],
                     "metrics": r.record["metrics"], "files": r.record["files"]}
            for r in results
        },
    }


def write_manifest(build_dir: Path, results: list[StageResult]) -> Path:
    from cqil.model.fsutil import atomic_write_text

    path = Path(build_dir) / "manifest.json"
    atomic_write_text(path, json.dumps(manifest(results), indent=2) + "\n")
    return path
