"""The build-once stage runner behind `cqil build` (DESIGN.md section 2).

Each stage writes one directory under the build directory and declares everything it reads: the
configuration (`params`), the earlier stages (`after`) and input files or folders (`files`, keyed by
their content). Its key hashes the tool version and that declaration, nothing else, and the runner lets
a stage open only the stages it declared (`StageContext.upstream`), so an input cannot be read without
being keyed: a change reruns exactly the stages that read it and those downstream of them.

A stage runs in a temporary directory that is renamed into place only once complete
(fsutil.atomic_dir), and its record (`.stage.json`: key, file sha256 and sizes, wall time, metrics) is
written inside it last. The record is a cache: a stage is skipped only when its key matches and its
files still hash to what the record lists. A build killed at any point resumes at the first stage whose
directory is missing, changed or keyed differently. One build per directory at a time (a lock file).
`manifest.json` (pipeline/manifest.py) is the build's authority, which `cqil verify` checks.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cqil.model.errors import CqilError
from cqil.model.fsutil import MARKER, MARKER_TEXT, atomic_dir, check_output_dir, has_marker, sha256_file
from cqil.model.version import __version__

RECORD = ".stage.json"
LOCK = ".build.lock"


@dataclass
class StageContext:
    """What a stage's function gets: where to write, the build directory, and upstream outputs."""

    out: Path  # the stage's temporary directory; renamed into place on success
    build_dir: Path
    params: dict[str, Any]
    key: str  # this run's stage key (names state that must outlive a killed stage, e.g. checkpoints)
    reads: Sequence[str] = ()  # the stages this one declared in `after`: the only ones it may open

    def upstream(self, name: str) -> Path:
        """The finished output directory of an earlier stage this one declared (its key is in ours)."""
        if name not in self.reads:
            raise RuntimeError(f"a stage read '{name}' without declaring it in `after` (its key would miss it)")
        return self.build_dir / name


@dataclass
class Stage:
    name: str
    run: Callable[[StageContext], dict[str, Any] | None]  # returns headline metrics
    params: dict[str, Any] = field(default_factory=dict)  # the configuration it reads
    after: Sequence[str] = ()  # stages whose outputs this one reads (their keys feed this key)
    files: dict[str, Path | None] = field(default_factory=dict)  # name -> input file or folder it reads (None: none)


def content_digest(path: Path) -> str:
    """sha256 of a file, or of a folder's visible files (their relative names and contents)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    listing = json.dumps(sorted((name, entry["sha256"]) for name, entry in file_entries(path).items()))
    return hashlib.sha256(listing.encode()).hexdigest()


def stage_key(stage: Stage, upstream_keys: dict[str, str]) -> str:
    """The hash of what `stage` declares it reads, and of nothing else."""
    files = {}
    for name, path in stage.files.items():
        if path is None:
            continue
        if not Path(path).exists():
            raise CqilError(f"{name} '{path}' does not exist (read by the {stage.name} stage): fix the path")
        files[name] = content_digest(path)
    payload = {
        "tool": __version__,
        "stage": stage.name,
        "params": stage.params,
        "after": {name: upstream_keys[name] for name in stage.after},
        "files": files,
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def stage_keys(stages: Sequence[Stage]) -> dict[str, str]:
    """Every stage's key, computed before any stage runs (a missing input file is refused here)."""
    keys: dict[str, str] = {}
    for stage in stages:
        missing = [name for name in stage.after if name not in keys]
        if missing:
            raise CqilError(f"stage '{stage.name}' reads {missing} which do not run before it")
        keys[stage.name] = stage_key(stage, keys)
    return keys


def read_record(directory: Path) -> dict[str, Any] | None:
    """A stage's cached record, or None when absent, unreadable or not of the shape the runner writes."""
    try:
        record = json.loads((directory / RECORD).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    needed = {"key": str, "files": dict, "seconds": (int, float), "metrics": dict}
    if not isinstance(record, dict) or not all(isinstance(record.get(k), t) for k, t in needed.items()):
        return None
    return record


def is_hidden(name: str) -> bool:
    """cqil's bookkeeping (records, markers, the lock, checkpoints): never an artifact, never recorded."""
    return name.startswith(".")


def file_entries(directory: Path, only: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """sha256 and size of every visible file under `directory` (or of the files `only` names that exist)."""
    paths = ([directory / name for name in only] if only is not None else sorted(directory.rglob("*")))
    return {
        path.relative_to(directory).as_posix(): {"sha256": sha256_file(path), "size": path.stat().st_size}
        for path in paths
        if path.is_file() and not any(is_hidden(part) for part in path.relative_to(directory).parts)
    }


def _up_to_date(final: Path, key: str) -> dict[str, Any] | None:
    """The stage's record when its folder holds exactly what the record lists under this key, else None.

    The record is only a cache: the files are hashed again, so a stage whose output was edited,
    truncated or deleted since it ran runs again instead of being trusted.
    """
    record = read_record(final)
    if record is None or record["key"] != key:
        return None
    return record if file_entries(final) == record["files"] else None


@contextmanager
def build_lock(build_dir: Path) -> Iterator[None]:
    """Refuse a second build into the same directory instead of interleaving with it."""
    build_dir.mkdir(parents=True, exist_ok=True)
    handle = open(build_dir / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise CqilError(f"another build is running in '{build_dir}' ({holder}): wait for it or use another --out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def is_build_dir(path: Path) -> bool:
    """A folder an earlier `cqil build` wrote (its marker, manifest or lock file): safe to build into."""
    return has_marker(path) or (path / "manifest.json").is_file() or (path / LOCK).is_file()


def _is_stage_dir(path: Path) -> bool:
    """A stage's own folder (its record), which a rerun of the stage replaces."""
    return (path / RECORD).is_file()


def claim_build_dir(build_dir: Path) -> None:
    """Mark `build_dir` as cqil's before writing into it; refuse a folder that holds anything else."""
    check_output_dir(build_dir, "--out", is_ours=is_build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    if not has_marker(build_dir):
        (build_dir / MARKER).write_text(MARKER_TEXT)


def remove_leftovers(build_dir: Path) -> None:
    """Delete the temporary directories of a killed build (safe: we hold the lock)."""
    for path in build_dir.glob(".*.tmp-*"):
        shutil.rmtree(path, ignore_errors=True)
    for path in build_dir.glob(".*.old-*"):
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class StageResult:
    name: str
    status: str  # "ran" | "skipped" (up to date)
    record: dict[str, Any]


def run_stages(stages: Sequence[Stage], build_dir: Path, force: Sequence[str] = (),
               until: str | None = None, log: Callable[[str], None] = print) -> list[StageResult]:
    """Run `stages` in order into `build_dir`, skipping those whose key is unchanged."""
    names = [stage.name for stage in stages]
    for name in [*force, *([until] if until else [])]:
        if name not in names:
            raise CqilError(f"unknown stage '{name}': the stages are {', '.join(names)}")
    results: list[StageResult] = []
    keys = stage_keys(stages)
    stopped = False
    claim_build_dir(build_dir)
    with build_lock(build_dir):
        remove_leftovers(build_dir)
        for stage in stages:
            key = keys[stage.name]
            final = build_dir / stage.name
            record = _up_to_date(final, key) if stage.name not in force else None
            if stopped:  # past --until: an earlier build's stage is part of this build only while up to date
                if record is None:
                    break
                results.append(StageResult(stage.name, "skipped", record))
            elif record is not None:
                log(f"[{stage.name}] up to date (key {key})")
                results.append(StageResult(stage.name, "skipped", record))
            else:
                log(f"[{stage.name}] running ...")
                start = time.perf_counter()
                with atomic_dir(final, is_ours=_is_stage_dir) as tmp:
                    metrics = stage.run(StageContext(out=tmp, build_dir=build_dir, params=stage.params, key=key,
                                                        reads=tuple(stage.after))) or {}
                    record = {
                        "stage": stage.name,
                        "key": key,
                        "params": stage.params,
                        "seconds": round(time.perf_counter() - start, 2),
                        "metrics": metrics,
                        "files": file_entries(tmp),
                    }
                    (tmp / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
                log(f"[{stage.name}] done in {record['seconds']} s")
                results.append(StageResult(stage.name, "ran", record))
            stopped = stopped or stage.name == until
    return results
