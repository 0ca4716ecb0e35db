"""The one interface every runner backend implements, and what all of them share: the caps on a
job's resources, the reader of a trainer's output and the failure reason."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from worker.events import PROGRESS_TOKEN_ENV, new_progress_token
from worker.outputs import read_text_file
from worker.workspace import Workspace

log = logging.getLogger(__name__)

# The reader's hard bound on one line: longer lines are cut here (the relay cuts log lines much
# shorter, see Settings.trainer_log_line_max_chars), so a trainer printing without newlines never
# makes the worker hold more than this.
READ_LINE_MAX_BYTES = 1024**2
FAILURE_MAX_CHARS = 4000


@dataclass(frozen=True)
class ResourceLimits:
    memory_bytes: int | None = None
    cpus: float | None = None
    pids: int | None = 1024
    shm_bytes: int | None = 1024**3


@dataclass(frozen=True)
class RunRequest:
    job_id: str
    workspace: Workspace
    trainer: str  # built-in trainer folder under trainer_images/ (e.g. "audio")
    image: str | None = None  # docker runner: the image to run (built-in or user's)
    deadline_s: int = 6 * 3600
    gpus: tuple[str, ...] = ()  # device ids assigned by the worker
    limits: ResourceLimits = field(default_factory=ResourceLimits)
    env: dict[str, str] = field(default_factory=dict)
    # The secret that marks this run's progress lines (RETRAIN_PROGRESS_TOKEN in the trainer's
    # environment; the relay needs the same value: TrainerOutputRelay(..., request.progress_token, ...)).
    progress_token: str = field(default_factory=new_progress_token, repr=False)

    def trainer_env(self) -> dict[str, str]:
        """What every runner adds last to the trainer's environment (request.env cannot override it)."""
        return {PROGRESS_TOKEN_ENV: self.progress_token}


class Outcome(StrEnum):
    succeeded = "succeeded"
    failed = "failed"
    timeout = "timeout"
    cancelled = "cancelled"
    out_of_memory = "out_of_memory"


@dataclass(frozen=True)
class RunResult:
    outcome: Outcome
    exit_code: int | None
    reason: str | None = None  # from /opt/ml/output/failure, or what the runner saw


class Runner(Protocol):
    def image_for(self, request: RunRequest) -> str | None:
        """The image a request runs in (None when the trainer runs as a host process)."""
        ...

    def run(self, request: RunRequest, on_line: Callable[[str], None], cancel: threading.Event) -> RunResult:
        """Run the trainer to its end. Blocks; calls `on_line` for every stdout/stderr line as it
        comes; stops the trainer when `cancel` is set or the deadline passes."""
        ...


# ---- caps on what a job may ask for ---------------------------------------------------------

class ResourcesRefused(ValueError):
    """A job asks for more than this worker allows; the message says what and the cap."""


@dataclass(frozen=True)
class ResourceCaps:
    """The most a job may have on this worker, whatever its spec.resources say (None = no cap)."""

    memory_bytes: int | None = None
    cpus: float | None = None
    gpus: int | None = None
    deadline_s: int | None = None

    @classmethod
    def from_settings(cls, settings) -> ResourceCaps:
        """Settings.job_max_*; unset memory = half of this host's RAM, unset cpus = its CPU count."""
        memory_mb = settings.job_max_memory_mb
        return cls(
            memory_bytes=memory_mb * 1024**2 if memory_mb else host_memory_bytes() // 2,
            cpus=settings.job_max_cpus or float(os.cpu_count() or 1),
            gpus=settings.job_max_gpus,
            deadline_s=settings.job_max_deadline_s,
        )


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def apply_caps(request: RunRequest, caps: ResourceCaps | None, defaults: ResourceLimits | None = None) -> RunRequest:
    """The request with the runner's defaults filling unset limits and checked against the caps.
    A limit still unset after the defaults becomes the cap (so a capped worker never runs a
    trainer without a memory limit). Raises ResourcesRefused when the job asks for more than a
    cap: more memory, CPUs, GPUs or a longer deadline. Runners call it first thing in run()."""
    req, dflt = request.limits, defaults or ResourceLimits(memory_bytes=None, cpus=None, pids=None, shm_bytes=None)
    limits = ResourceLimits(
        memory_bytes=req.memory_bytes if req.memory_bytes is not None else dflt.memory_bytes,
        cpus=req.cpus if req.cpus is not None else dflt.cpus,
        pids=req.pids if req.pids is not None else dflt.pids,
        shm_bytes=req.shm_bytes if req.shm_bytes is not None else dflt.shm_bytes,
    )
    if caps is None:
        return dataclasses.replace(request, limits=limits)
    over = []
    memory = limits.memory_bytes
    if caps.memory_bytes is not None:
        if memory is not None and memory > caps.memory_bytes:
            if req.memory_bytes is not None:
                over.append(f"memory {memory // 2**20} MiB (this worker allows at most {caps.memory_bytes // 2**20} MiB)")
            memory = caps.memory_bytes  # a runner default above the cap is lowered to it
        memory = caps.memory_bytes if memory is None else memory
    cpus = limits.cpus
    if caps.cpus is not None:
        if cpus is not None and cpus > caps.cpus:
            if req.cpus is not None:
                over.append(f"{cpus:g} CPUs (this worker allows at most {caps.cpus:g})")
            cpus = caps.cpus
        cpus = caps.cpus if cpus is None else cpus
    if caps.gpus is not None and len(request.gpus) > caps.gpus:
        over.append(f"{len(request.gpus)} GPUs (this worker allows at most {caps.gpus})")
    deadline = request.deadline_s
    if caps.deadline_s is not None and deadline > caps.deadline_s:
        over.append(f"a deadline of {deadline} s (this worker allows at most {caps.deadline_s} s)")
    shm = limits.shm_bytes
    if shm is not None and memory is not None and shm > memory:
        shm = memory  # /dev/shm counts against the memory limit anyway
    if over:
        raise ResourcesRefused("the job asks for more than this worker allows: " + "; ".join(over))
    return dataclasses.replace(request, limits=ResourceLimits(memory_bytes=memory, cpus=cpus, pids=limits.pids,
                                                             shm_bytes=shm))


def cpu_count_for(limits: ResourceLimits) -> int | None:
    return max(1, math.ceil(limits.cpus)) if limits.cpus else None


# ---- reading the trainer's output --------------------------------------------------------------

class LineSplitter:
    """Bytes as they come -> lines (str, without the newline), none longer than `max_bytes`:
    a longer line is cut there and the rest of it, up to its newline, is dropped."""

    def __init__(self, max_bytes: int = READ_LINE_MAX_BYTES):
        self.max_bytes = max_bytes
        self.buf = bytearray()
        self.discarding = False  # inside a line that was already cut
        self.cut_lines = 0

    def feed(self, chunk: bytes) -> list[str]:
        lines = []
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            piece = chunk[start:] if nl < 0 else chunk[start:nl]
            if not self.discarding:
                room = self.max_bytes - len(self.buf)
                self.buf += piece[:room]
                if len(piece) > room:
                    lines.append(self._take(cut=True))
                    self.discarding = True
            if nl < 0:
                return lines
            if self.discarding:
                self.discarding = False
            else:
                lines.append(self._take())
            start = nl + 1

    def close(self) -> list[str]:
        return [self._take()] if self.buf and not self.discarding else []

    def _take(self, cut: bool = False) -> str:
        line = bytes(self.buf).decode("utf-8", errors="replace").rstrip("\r")
        self.buf.clear()
        if cut:
            self.cut_lines += 1
            line += " [... line cut by the worker]"
        return line


def relay_lines(chunks: Iterable[bytes], on_line: Callable[[str], None], what: str = "trainer",
                tail=None, max_bytes: int = READ_LINE_MAX_BYTES) -> None:
    """Read every chunk to the end, splitting lines, and call on_line for each. Survives anything:
    a failing callback or undecodable bytes are logged and the reading goes on, so the trainer's
    pipe never fills and the trainer never blocks on it."""
    splitter = LineSplitter(max_bytes)
    failures = 0

    def deliver(lines: list[str]) -> None:
        nonlocal failures
        for line in lines:
            if tail is not None:
                tail.append(line[:500])
            try:
                on_line(line)
            except Exception:  # noqa: BLE001
                failures += 1
                if failures <= 5:
                    log.exception("%s: on_line failed on a line; going on", what)

    try:
        for chunk in chunks:
            try:
                deliver(splitter.feed(chunk))
            except Exception:  # noqa: BLE001 - never let one chunk end the reader
                log.exception("%s: could not split output; going on", what)
        deliver(splitter.close())
    except Exception:  # noqa: BLE001 - the stream itself broke (engine gone, pipe error)
        log.exception("%s: output stream ended with an error", what)


def fd_chunks(fd: int, size: int = 65536) -> Iterable[bytes]:
    while True:
        try:
            chunk = os.read(fd, size)
        except InterruptedError:
            continue
        except OSError:
            return
        if not chunk:
            return
        yield chunk


def failure_reason(workspace: Workspace, fallback: str, max_chars: int = FAILURE_MAX_CHARS) -> str:
    """The trainer's `output/failure`, read without following links (a link to a host file, a
    FIFO or a device is ignored: the fallback is used), cut to `max_chars`."""
    text = read_text_file(workspace.root, "output/failure", max_bytes=max_chars * 4)
    text = (text or "").strip()
    if len(text) > max_chars:
        text = text[:max_chars]
    return text or fallback
