"""Filesystem helpers: the cache location and writes that are never left half-done."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    """Where converted models live: $CQIL_CACHE, else the user's cache directory."""
    root = os.environ.get("CQIL_CACHE")
    if root:
        return Path(root).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cqil"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: Path, what: str, missing_hint: str) -> Any:
    """A user-supplied JSON file, or a one-line CqilError naming it (absent, or not JSON)."""
    from cqil.model.errors import CqilError

    path = Path(path)
    if not path.is_file():
        raise CqilError(f"{what} '{path}' does not exist: {missing_hint}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CqilError(f"{what} '{path}' is not valid JSON ({exc})") from exc


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link where the filesystem allows (no second copy of multi-GB weights), else copy."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


# Every folder cqil writes as a whole carries this file, so that a later run may replace it (and
# never a folder that holds anything else: a user's files are not ours to delete).
MARKER = ".cqil-output"
MARKER_TEXT = "This folder was written by cqil; a later cqil run may replace it as a whole.\n"


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def has_marker(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def _blocking_file(path: Path) -> Path | None:
    """The first ancestor of `path` that exists as something other than a folder, if any."""
    for parent in reversed(Path(path).absolute().parents):
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def _probe_writable(folder: Path, path: Path, option: str) -> None:
    """Create and remove a temporary folder in `folder`: the only test of writability that root obeys."""
    from cqil.model.errors import CqilError

    try:
        os.rmdir(tempfile.mkdtemp(prefix=".cqil-probe-", dir=folder))
    except OSError as exc:
        raise CqilError(f"cannot write to '{path}' ({exc.strerror or exc}): choose another {option}") from exc


def _nearest_existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def check_output_dir(path: Path, option: str = "--out", is_ours: Callable[[Path], bool] | None = None) -> None:
    """Refuse, before any work, a folder output that cannot be written or that holds what cqil did not write.

    `is_ours` recognizes an earlier output of this kind (default: the MARKER file); an empty folder is
    always accepted.
    """
    from cqil.model.errors import CqilError

    path = Path(path)
    blocker = _blocking_file(path)
    if blocker is not None:
        raise CqilError(f"cannot write to '{path}': '{blocker}' is a file, not a folder: choose another {option}")
    if path.is_symlink() and not path.exists():
        raise CqilError(f"{option} '{path}' is a symbolic link to '{os.readlink(path)}', which does not exist: "
                        "create its target folder, or give another folder")
    if path.exists() and not path.is_dir():
        raise CqilError(f"{option} '{path}' is a file: give a folder (it is written as a whole)")
    if path.is_dir():
        if str(path.absolute()) in ("/", str(Path.home())) or path.absolute() == Path.cwd():
            raise CqilError(f"{option} '{path}' is the current, home or root folder: give a folder of its own")
        if any(path.iterdir()) and not (is_ours or has_marker)(path):
            raise CqilError(f"{option} '{path}' already holds files that cqil did not write: give a new or "
                            "empty folder, or move those files away (cqil replaces only folders it wrote)")
        _probe_writable(path, path, option)  # an earlier output is replaced: it must be removable
    _probe_writable(_nearest_existing(path.absolute().parent), path, option)


def check_output_file(path: Path, option: str) -> None:
    """Refuse, before any work, a file output whose place cannot be written."""
    from cqil.model.errors import CqilError

    path = Path(path)
    blocker = _blocking_file(path)
    if blocker is not None:
        raise CqilError(f"cannot write to '{path}': '{blocker}' is a file, not a folder: choose another {option}")
    if path.is_dir():
        raise CqilError(f"{option} '{path}' is a folder: give a file name")
    if not path.name or path.name in (".", ".."):
        raise CqilError(f"{option} '{path}' names no file: give a file name")
    _probe_writable(_nearest_existing(path.absolute().parent), path, option)


def follow_umask(folder: Path) -> None:
    """Give every file under `folder` at least the permissions the umask allows (0644 under 022).

    Some writers make their files private whatever the umask: safetensors writes weights through a
    mkstemp file (0600) renamed into place, so a server running as another user could not read a
    model that every other output of the same command lets it read.
    """
    allowed = 0o666 & ~_umask()
    for path in Path(folder).rglob("*"):
        info = path.lstat()
        # A hard link (the build's source/) shares its mode with a file cqil did not write: left as it is.
        if stat.S_ISREG(info.st_mode) and info.st_nlink == 1 and stat.S_IMODE(info.st_mode) & allowed != allowed:
            path.chmod(stat.S_IMODE(info.st_mode) | allowed)


@contextlib.contextmanager
def atomic_dir(final: Path, is_ours: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; rename it into place only if the block succeeds.

    An interrupted or failed write leaves `final` as it was (absent or the old version). An existing
    `final` is replaced only if it is empty or cqil's (`is_ours`, default: it holds the MARKER file,
    which is then written into the new folder too; a caller with its own rule writes no marker).
    """
    from cqil.model.errors import CqilError

    final = Path(final)
    if final.exists() and not final.is_dir():
        raise CqilError(f"'{final}' is a file: cqil writes a folder there and will not replace a file")
    if final.is_dir() and any(final.iterdir()) and not (is_ours or has_marker)(final):
        raise CqilError(f"'{final}' already holds files that cqil did not write: give a new or empty folder")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result should be an ordinary folder
    try:
        yield tmp
        follow_umask(tmp)
        if is_ours is None:
            (tmp / MARKER).write_text(MARKER_TEXT)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file through a temporary name so readers never see half of it."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file through a temporary name so readers never see half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
