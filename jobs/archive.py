"""The one archive reader of the API and the worker: zip and tar(.gz/.bz2/.xz) uploads are listed,
checked and extracted with a bounded cost.

The rule: untrusted archive bytes are never parsed inside the API's or the worker's own process.
Each operation starts `jobs/archive_probe.py` in a child Python (`-I -S`, standard library only)
that caps its own CPU time (RLIMIT_CPU), address space (RLIMIT_AS) and file sizes (RLIMIT_FSIZE)
before it reads a byte, and the parent kills it after a wall-clock timeout. Whatever a crafted
archive does to the interpreter's tarfile/zipfile, it can cost at most that much; the parent
reads only the child's JSON answer, itself bounded.

Before anything is extracted, every entry is checked: entry count, total unpacked size, ratio of
unpacked size to archive size, regular files and folders only (no links, devices, fifos), names
that are valid UTF-8, relative and stay inside (no absolute path, '..', drive letter, NUL), no
name twice, no encrypted zip member or unsupported compression. Extraction then writes regular
files only, under the destination, never through a link and never over an existing file, and
stops at the byte bounds; CRCs are verified as members are read.
"""

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from jobs import archive_probe
from jobs.archive_probe import normalize_name, sniff

__all__ = [
    "ArchiveError", "ArchiveLimits", "Entry", "Listing", "archive_kind", "extract_archive",
    "list_archive", "normalize_name", "scan_archive",
]

PROBE = Path(archive_probe.__file__).resolve()
MAX_ANSWER_BYTES = 4 * archive_probe.MAX_NAMES_BYTES + 64 * 1024 * 1024


class ArchiveError(ValueError):
    """The archive is refused. `entry` names the member when one is to blame; `too_large` marks
    a size bound (count, bytes, ratio, memory), which the API answers with 413."""

    def __init__(self, message: str, entry: str | None = None, too_large: bool = False):
        super().__init__(f"{entry!r}: {message}" if entry else message)
        self.message, self.entry, self.too_large = message, entry, too_large


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds on reading one archive (see the upload bounds in jobs/settings.py)."""

    max_entries: int = 100_000
    max_total_bytes: int = 8 * 1024**3
    max_ratio: float = 50.0
    cpu_seconds: int = 120
    memory_bytes: int = 1024**3
    timeout_s: float = 300.0

    @classmethod
    def from_settings(cls, settings) -> "ArchiveLimits":
        return cls(
            max_entries=settings.archive_max_entries, max_total_bytes=settings.archive_max_total_bytes,
            max_ratio=settings.archive_max_ratio, cpu_seconds=settings.archive_cpu_seconds,
            memory_bytes=settings.archive_memory_bytes, timeout_s=settings.archive_timeout_s,
        )


@dataclass(frozen=True)
class Entry:
    name: str  # normalized: relative, '/'-separated, no '.' parts
    size: int  # bytes once unpacked (0 for a folder)
    type: str  # 'file' or 'dir'


@dataclass
class Listing:
    kind: str  # 'zip' or 'tar'
    compression: str | None  # tar only: 'gzip', 'bzip2', 'xz' or None
    entries: list[Entry]

    @property
    def files(self) -> dict[str, Entry]:
        return {e.name: e for e in self.entries if e.type == "file"}

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.entries)


@dataclass
class Extracted:
    listing: Listing
    names: list[str]  # what was written under the destination


Source = str | os.PathLike | BinaryIO


def archive_kind(source: Source) -> str | None:
    """'zip', 'tar' (plain, gzip, bzip2 or xz) or None, judged by the first bytes alone (nothing
    is parsed here). A compressed file counts as 'tar' until the reader has looked inside."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as fp:
            head = fp.read(archive_probe.BLOCK)
    else:
        source.seek(0)
        head = source.read(archive_probe.BLOCK)
        source.seek(0)
    found = sniff(head)
    return found[0] if found else None


def list_archive(source: Source, limits: ArchiveLimits = ArchiveLimits()) -> Listing:
    """Every entry, after all of them passed the checks."""
    return _listing(_run("list", source, limits))


def extract_archive(source: Source, dest: Path, limits: ArchiveLimits = ArchiveLimits(),
                    names: Iterable[str] | None = None) -> Extracted:
    """Checks every entry, then writes the files named in `names` (all files when None) under
    `dest`, which must exist. Names not in the archive are skipped: compare with the listing."""
    dest = Path(dest)
    request = {"dest": str(dest.resolve())}
    if names is not None:
        request["names"] = sorted(set(names))
    answer = _run("extract", source, limits, **request)
    return Extracted(_listing(answer), answer["extracted"])


def scan_archive(source: Source, limits: ArchiveLimits = ArchiveLimits(),
                 heads: Iterable[tuple[str, int]] = ()) -> tuple[Listing, dict[str, bytes]]:
    """Checks every entry and reads every file through (CRCs and sizes verified, nothing written).
    `heads` are (name suffix, n) rules: the first n bytes of each file whose name ends with the
    suffix come back (the first matching rule counts)."""
    answer = _run("scan", source, limits, heads=[list(rule) for rule in heads])
    import base64

    return _listing(answer), {name: base64.b64decode(data) for name, data in answer["heads"].items()}


def _listing(answer: dict) -> Listing:
    return Listing(answer["kind"], answer["compression"], [Entry(n, s, t) for n, s, t in answer["entries"]])


def _run(op: str, source: Source, limits: ArchiveLimits, **request) -> dict:
    with _as_path(source) as (path, pass_fds):
        request = {
            "op": op, "archive": path, **request,
            "limits": {
                "max_entries": limits.max_entries, "max_total_bytes": limits.max_total_bytes,
                "max_ratio": limits.max_ratio, "cpu_seconds": limits.cpu_seconds,
                "memory_bytes": limits.memory_bytes,
            },
        }
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.run(
                    [sys.executable, "-I", "-S", str(PROBE)], input=json.dumps(request).encode(),
                    stdout=out, stderr=err, pass_fds=pass_fds, timeout=limits.timeout_s,
                    env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"},
                )
            except subprocess.TimeoutExpired:
                raise ArchiveError(f"took longer than {limits.timeout_s:g} s to read; refused", too_large=True) from None
            out.seek(0)
            raw = out.read(MAX_ANSWER_BYTES + 1)
            if proc.returncode != 0 or not raw:
                err.seek(0)
                tail = err.read()[-2000:].decode("utf-8", "replace")
                killed = proc.returncode < 0 or "MemoryError" in tail
                raise ArchiveError(
                    "could not be read within the CPU and memory allowed for one archive (malformed or crafted?)"
                    if killed else f"could not be read (reader exited with {proc.returncode})", too_large=killed)
            if len(raw) > MAX_ANSWER_BYTES:
                raise ArchiveError("lists more than the reader may answer", too_large=True)
    answer = json.loads(raw)
    if not answer["ok"]:
        raise ArchiveError(answer["error"], entry=answer.get("entry"), too_large=bool(answer.get("too_large")))
    return answer


class _as_path:
    """A path the child can open: the file's own path, /dev/fd/N for an open file (a new open
    file description, so the parent's offset is untouched), or a temporary copy of a buffer."""

    def __init__(self, source: Source):
        self.source, self.tmp = source, None

    def __enter__(self) -> tuple[str, tuple[int, ...]]:
        if isinstance(self.source, (str, os.PathLike)):
            return str(Path(self.source).resolve()), ()
        try:
            fd = self.source.fileno()  # a SpooledTemporaryFile rolls over to disk here
            self.source.flush()
            return f"/dev/fd/{fd}", (fd,)
        except (AttributeError, OSError, ValueError):
            pass
        self.tmp = tempfile.NamedTemporaryFile(prefix="retrain-archive-")
        self.source.seek(0)
        while chunk := self.source.read(1024 * 1024):
            self.tmp.write(chunk)
        self.tmp.flush()
        self.source.seek(0)
        return self.tmp.name, ()

    def __exit__(self, *exc):
        if self.tmp is not None:
            self.tmp.close()
