"""Job states and the events on `retrain.job-events` (key = job id, so a job's events stay in order)."""

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field

from jobs.spec import SCHEMA_VERSION


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.succeeded, JobState.failed, JobState.cancelled)


class EventType(StrEnum):
    accepted = "accepted"
    started = "started"
    progress = "progress"
    log = "log"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


# The state an event moves a job to; progress and log events leave it running.
STATE_AFTER = {
    EventType.accepted: JobState.queued,
    EventType.started: JobState.running,
    EventType.progress: JobState.running,
    EventType.log: JobState.running,
    EventType.succeeded: JobState.succeeded,
    EventType.failed: JobState.failed,
    EventType.cancelled: JobState.cancelled,
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class JobEvent(BaseModel):
    """One thing that happened to a job.

    data by type:
      started    {"worker": str, "attempt": int}
      progress   {"epoch": int, "epochs": int, "step": int, "metrics": {name: float}}  (trainer's line)
      log        {"line": str}
      succeeded  {"model_name": str, "model_version": int, "metrics": {...}}
      failed     {"reason": str}
      cancelled  {"reason": str}
    """

    schema_version: int = SCHEMA_VERSION
    job_id: str
    type: EventType
    time: datetime = Field(default_factory=utcnow)
    data: dict[str, Any] = Field(default_factory=dict)


class ControlCommand(BaseModel):
    """A command on `retrain.control`; every worker sees every command."""

    schema_version: int = SCHEMA_VERSION
    command: str  # "cancel"
    job_id: str
    time: datetime = Field(default_factory=utcnow)
