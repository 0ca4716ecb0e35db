"""The one interface every runner backend implements."""

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from worker.workspace import Workspace


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


def failure_reason(workspace: Workspace, fallback: str) -> str:
    try:
        text = workspace.failure_file.read_text(errors="replace").strip()
    except OSError:
        text = ""
    return text[:4000] or fallback
