"""The build-once stage runner behind `cqil build` (DESIGN.md section 2).

Each stage writes one directory under the build directory. Its key is the hash of the tool version,
its parameters and the keys of the stages it reads, so a parameter change reruns that stage and the
stages downstream of it, nothing else. A stage runs in a temporary directory that is renamed into
place only once complete (fsutil.atomic_dir), and its record (`.stage.json`: key, file hashes, wall
time, metrics) is written inside it last — a build killed at any point resumes at the first stage
whose directory is missing or whose key differs. One build per directory at a time (a lock file).
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
from cqil.model.fsutil import MARKER, atomic_dir, has_marker, sha256_file
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

    def upstream(self, name: str) -> Path:
        """The finished output directory of an earlier stage."""
        return self.build_dir / name


@dataclass
class Stage:
    name: str
    run: Callable[[StageContext], dict[str, Any] | None]  # returns headline metrics
    params: dict[str, Any] = field(default_factory=dict)
    after: Sequence[str] = ()  # stages whose outputs this one reads (their keys feed this key)


def stage_key(stage: Stage, upstream_keys: dict[str, str]) -> str:
    payload = {
        "tool": __version__,
        "stage": stage.name,
        "params": stage.params,
        "after": {name: upstream_keys[name] for name in stage.after},
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def read_record(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / RECORD).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def file_hashes(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): sha256_file(path)
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != RECORD
    }


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
    from cqil.model.fsutil import MARKER_TEXT, check_output_dir

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
    keys: dict[str, str] = {}
    claim_build_dir(build_dir)
    with build_lock(build_dir):
        remove_leftovers(build_dir)
        for stage in stages:
            missing = [name for name in stage.after if name not in keys]
            if missing:
                raise CqilError(f"stage '{stage.name}' reads {missing} which do not run before it")
            key = keys[stage.name] = stage_key(stage, keys)
            final = build_dir / stage.name
            record = read_record(final)
            if record and record.get("key") == key and stage.name not in force:
                log(f"[{stage.name}] up to date (key {key})")
                results.append(StageResult(stage.name, "skipped", record))
            else:
                log(f"[{stage.name}] running ...")
                start = time.perf_counter()
                with atomic_dir(final, is_ours=_is_stage_dir) as tmp:
                    metrics = stage.run(StageContext(out=tmp, build_dir=build_dir, params=stage.params, key=key)) or {}
                    record = {
                        "stage": stage.name,
                        "key": key,
                        "params": stage.params,
                        "seconds": round(time.perf_counter() - start, 2),
                        "metrics": metrics,
                        "files": file_hashes(tmp),
                    }
                    (tmp / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
                log(f"[{stage.name}] done in {record['seconds']} s")
                results.append(StageResult(stage.name, "ran", record))
            if stage.name == until:
                break
    return results


def verify_build(build_dir: Path) -> list[str]:
    """Problems with a finished build: files changed, missing or added since their stage wrote them."""
    problems = []
    for directory in sorted(p for p in build_dir.iterdir() if p.is_dir()):
        record = read_record(directory)
        if record is None:
            continue
        actual = file_hashes(directory)
        for name, digest in record["files"].items():
            if name not in actual:
                problems.append(f"{directory.name}/{name}: missing")
            elif actual[name] != digest:
                problems.append(f"{directory.name}/{name}: changed (sha256 {actual[name][:12]}, recorded {digest[:12]})")
        problems += [f"{directory.name}/{name}: not in the record" for name in actual if name not in record["files"]]
    return problems
