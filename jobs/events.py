"""Job states and the events on `retrain.job-events` (key = job id, so a job's events stay in order)."""

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

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
      progress   ProgressRecord.event_data(): {"epoch": int, "epochs": int, "step": int,
                 "metrics": {name: float | None}, "phase": str}, each key optional (validated)
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


# ---- What a trainer may say about its progress -------------------------------------------------
# A trainer is outside code (a bring-your-own image runs anything), so its progress record is
# checked against this schema before it becomes an event; the bounds keep every value inside the
# job record's columns (32-bit integers in PostgreSQL) and the record small.

PROGRESS_MAX_EPOCH = 1_000_000
PROGRESS_MAX_STEP = 2**31 - 1
PROGRESS_MAX_METRICS = 64
METRIC_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.:/-]{0,63}$"

MetricName = Annotated[str, StringConstraints(pattern=METRIC_NAME_PATTERN)]
FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-1e300, le=1e300)]


class ProgressRecord(BaseModel):
    """One progress record as a trainer sends it (trainer_images/CONTRACT.md, "Progress").

    Every key is optional, no other key is allowed (so a record can never set an event's
    `job_id` or `type`: the worker sets those), integers are JSON integers (not strings, floats
    or booleans) within the bounds below, and metric values are finite numbers or null.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    epoch: int | None = Field(None, strict=True, ge=0, le=PROGRESS_MAX_EPOCH)
    epochs: int | None = Field(None, strict=True, ge=0, le=PROGRESS_MAX_EPOCH)
    step: int | None = Field(None, strict=True, ge=0, le=PROGRESS_MAX_STEP)
    metrics: dict[MetricName, FiniteFloat | None] = Field(default_factory=dict, max_length=PROGRESS_MAX_METRICS)
    phase: Annotated[str, StringConstraints(pattern=r"^[^\x00-\x1f\x7f]{1,64}$")] | None = None  # a label, no control characters

    def event_data(self) -> dict[str, Any]:
        """The `data` of the progress event: only the keys the trainer set."""
        return self.model_dump(exclude_none=True, exclude_defaults=False)


class ControlCommand(BaseModel):
    """A command on `retrain.control`; every worker sees every command."""

    schema_version: int = SCHEMA_VERSION
    command: str  # "cancel"
    job_id: str
    time: datetime = Field(default_factory=utcnow)
