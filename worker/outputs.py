"""What the worker takes from a trainer's workspace, without following anything the trainer made.

A trainer (a bring-your-own image above all) controls every file under `model/`, `output/` and
`checkpoints/`: it can replace its failure file, metrics.json or a model file with a symlink to a
host file (/etc/passwd, the worker's credentials), a FIFO that blocks a reader forever, a device,
or a directory link; it can write a million files or a sparse 1 TB file. So the worker reads
those paths only through this module:

    results = collect_results(workspace, workspace.root / "results", settings)   # or collect_outputs(..., max_files=, max_bytes=)
    store.publish_version(name, job_id, results.model_dir, results.data_dir, ...)   # link-free copies
    reason = read_text_file(workspace.root, "output/failure", max_bytes=64 * 1024)

Every path component below the root is opened relative to its parent's file descriptor with
O_NOFOLLOW, and every file is fstat-checked after opening (so a swap between looking and opening
changes nothing): only regular files and real directories are taken; links, FIFOs, sockets and
devices are skipped (and listed in `Collected.skipped`), never opened. The copies belong to the
worker, in a directory the trainer cannot reach (it is not mounted into the container), and hold
no links, so what the store publishes is exactly what was checked.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

log = logging.getLogger(__name__)

MAX_DEPTH = 32
_CHUNK = 1024**2
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class OutputsTooLarge(ValueError):
    """The trainer's outputs exceed the worker's bounds (file count or bytes): the job fails."""


@dataclass
class Collected:
    root: Path  # the worker-owned copy: root/model and root/data
    model_dir: Path
    data_dir: Path
    files: int = 0
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)  # "model/x: a symbolic link", ...


@dataclass
class _Budget:
    max_files: int
    max_bytes: int
    entries: int = 0
    bytes: int = 0


def collect_outputs(workspace, dest: Path, *, max_files: int, max_bytes: int) -> Collected:
    """Copy the trainer's `model/` to `dest/model` and `output/data/` to `dest/data` (regular files
    and directories only; `dest` is replaced). Raises OutputsTooLarge when the two together hold
    more than `max_files` entries or `max_bytes` bytes. A missing source gives an empty folder."""
    dest = Path(dest)
    if dest.exists() or dest.is_symlink():
        if dest.is_symlink() or not dest.is_dir():
            dest.unlink()
        else:
            shutil.rmtree(dest)  # fd-based on Linux: never follows links
    result = Collected(root=dest, model_dir=dest / "model", data_dir=dest / "data")
    dest.mkdir(parents=True, mode=0o700)
    budget = _Budget(max_files, max_bytes)
    for relative, target in (("model", result.model_dir), ("output/data", result.data_dir)):
        target.mkdir(mode=0o755)
        copy_tree(Path(workspace.root), relative, target, budget=budget, skipped=result.skipped)
    result.files, result.bytes = budget.entries, budget.bytes
    for note in result.skipped[:20]:
        log.warning("trainer output not taken: %s", note)
    return result


def collect_results(workspace, dest: Path, settings) -> Collected:
    """collect_outputs with the bounds of Settings.output_max_files / output_max_bytes."""
    return collect_outputs(workspace, dest, max_files=settings.output_max_files, max_bytes=settings.output_max_bytes)


def copy_tree(root: Path, relative: str, dest: Path, *, max_files: int | None = None, max_bytes: int | None = None,
              budget: _Budget | None = None, skipped: list[str] | None = None) -> list[str]:
    """Copy the directory `root/relative` (no component a link) into the existing `dest`, taking
    only regular files and directories, within the bounds. Returns what it skipped."""
    if budget is None:
        if max_files is None or max_bytes is None:
            raise TypeError("copy_tree needs max_files and max_bytes (or a budget)")
        budget = _Budget(max_files, max_bytes)
    skipped = [] if skipped is None else skipped
    try:
        fd = _open_dir_under(root, relative)
    except FileNotFoundError:
        return skipped
    except OSError as err:
        skipped.append(f"{relative}: {_why(err)}")
        return skipped
    try:
        _copy_dir(fd, dest, relative, budget, skipped, depth=0)
    finally:
        os.close(fd)
    return skipped


def read_small_file(root: Path, relative: str, max_bytes: int, *, truncate: bool = False) -> bytes | None:
    """The bytes of the regular file `root/relative`, opened without following any link below
    `root`. None when it is missing, not a regular file (a link, FIFO, device, directory) or
    larger than `max_bytes` (with `truncate`, its first `max_bytes` bytes instead)."""
    parent, name = _split(relative)
    try:
        dir_fd = _open_dir_under(root, parent)
    except OSError as err:
        if err.errno != errno.ENOENT:
            log.warning("not reading %s: %s", relative, _why(err))
        return None
    try:
        fd = _open_regular(dir_fd, name)
    except FileNotFoundError:
        return None
    except OSError as err:
        log.warning("not reading %s: %s", relative, _why(err))
        return None
    finally:
        os.close(dir_fd)
    try:
        data = _read_at_most(fd, max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        if not truncate:
            log.warning("not reading %s: larger than %d bytes", relative, max_bytes)
            return None
        data = data[:max_bytes]
    return data


def read_text_file(root: Path, relative: str, max_bytes: int) -> str | None:
    """read_small_file, truncated to `max_bytes` and decoded (bad UTF-8 replaced)."""
    data = read_small_file(root, relative, max_bytes, truncate=True)
    return None if data is None else data.decode("utf-8", errors="replace")


def read_json_object(root: Path, relative: str, max_bytes: int) -> dict | None:
    """A JSON object from a small regular file (see read_small_file); None when it is missing,
    unsafe, too large or not a JSON object."""
    data = read_small_file(root, relative, max_bytes)
    if data is None:
        return None
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        log.warning("%s is not valid JSON", relative)
        return None
    return value if isinstance(value, dict) else None


# ---------------------------------------------------------------------------------- internals

def _split(relative: str) -> tuple[str, str]:
    parts = _parts(relative)
    if not parts:
        raise ValueError(f"not a file path: {relative!r}")
    return "/".join(parts[:-1]), parts[-1]


def _parts(relative: str) -> list[str]:
    path = PurePosixPath(relative)
    if path.is_absolute() or any(p in ("..", ".") for p in path.parts):
        raise ValueError(f"not a relative path inside the workspace: {relative!r}")
    return [p for p in path.parts if p]


def _open_dir_under(root: Path, relative: str) -> int:
    """A descriptor of the directory root/relative, with no component below root a link."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # root is the worker's own
    try:
        for part in _parts(relative):
            next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_regular(dir_fd: int, name: str) -> int:
    """Open a regular file in dir_fd without following a link and without opening anything else
    (a FIFO would block, a device could act on being opened)."""
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, _kind(st.st_mode))
    fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    opened = os.fstat(fd)
    if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise OSError(errno.EINVAL, "replaced while being opened")
    return fd


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks, size = [], 0
    while size < limit:
        chunk = os.read(fd, min(_CHUNK, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _copy_dir(dir_fd: int, dest: Path, relative: str, budget: _Budget, skipped: list[str], depth: int) -> None:
    with os.scandir(dir_fd) as it:
        names = [entry.name for entry in it]
    for name in sorted(names):
        rel = f"{relative}/{name}"
        budget.entries += 1
        if budget.entries > budget.max_files:
            raise OutputsTooLarge(f"the trainer's outputs hold more than {budget.max_files} files")
        if not _safe_name(name):
            skipped.append(f"{relative}/{name!r}: a name with control characters or not UTF-8")
            continue
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode):
            if depth + 1 >= MAX_DEPTH:
                skipped.append(f"{rel}: deeper than {MAX_DEPTH} levels")
                continue
            try:
                sub = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            except OSError as err:
                skipped.append(f"{rel}: {_why(err)}")
                continue
            try:
                if (os.fstat(sub).st_dev, os.fstat(sub).st_ino) != (st.st_dev, st.st_ino):
                    skipped.append(f"{rel}: replaced while being opened")
                    continue
                (dest / name).mkdir(mode=0o755)
                _copy_dir(sub, dest / name, rel, budget, skipped, depth + 1)
            finally:
                os.close(sub)
        elif stat.S_ISREG(st.st_mode):
            if budget.bytes + st.st_size > budget.max_bytes:
                raise OutputsTooLarge(f"the trainer's outputs are larger than {budget.max_bytes} bytes")
            try:
                fd = _open_regular(dir_fd, name)
            except OSError as err:
                skipped.append(f"{rel}: {_why(err)}")
                continue
            try:
                _copy_file(fd, dest / name, budget)
            finally:
                os.close(fd)
        else:
            skipped.append(f"{rel}: {_kind(st.st_mode)}")


def _copy_file(fd: int, target: Path, budget: _Budget) -> None:
    out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        while True:
            chunk = os.read(fd, _CHUNK)
            if not chunk:
                break
            budget.bytes += len(chunk)
            if budget.bytes > budget.max_bytes:  # it grew after the size check
                raise OutputsTooLarge(f"the trainer's outputs are larger than {budget.max_bytes} bytes")
            view = memoryview(chunk)
            while view:
                view = view[os.write(out, view):]
    finally:
        os.close(out)


def _safe_name(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes come back as surrogates
        return False
    return not any(ord(ch) < 32 or ord(ch) == 127 for ch in name)


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a regular file"


def _why(err: OSError) -> str:
    if err.errno in (errno.ELOOP, errno.ENOTDIR):
        return "a symbolic link or not a directory"
    return err.strerror or str(err)
