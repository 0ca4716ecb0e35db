"""Every change of a job's state, in one place: the states, the typed outcome a run ends with, and
the one transition function the API and the worker both apply.

    queued ──started──▶ running ──succeeded / failed / cancelled──▶ (finished, for ever)
       └────────────── cancelled / failed (before any worker ran it) ──────┘

Two records follow a job, and both change only through this module's rules:

- the store's `jobs/<id>/outcome.json`, the truth every worker reads: written once, first writer
  wins (an S3 conditional write, `ModelStore.record_job_outcome`), so a cancel and a finishing
  run can race and exactly one of them becomes the outcome, and a stale run never overwrites it;
- the API's job row, which folds in the events of `retrain.job-events` through `transition`
  (`api.job_events.apply_event`): a finished job stays finished, late and duplicate events
  change nothing.

A cancel is an outcome like any other: the API writes `cancelled` as the job's outcome unless one
is already there. A worker running the job sees it (control message at once, and its lease
renewal reads the outcome every few seconds) and stops; a worker that takes the job later, from
a redelivered message, finds the outcome and does not run it. So a cancel sent while no worker
holds the job is not lost.
"""

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from jobs.events import EventType, JobState
from jobs.spec import MODEL_NAME_PATTERN

__all__ = ["JobState", "Outcome", "transition"]

MAX_REASON = 4000  # characters of a failure reason kept

# The state each event moves an unfinished job to; accepted and log events change nothing.
_TARGET = {
    EventType.started: JobState.running,
    EventType.progress: JobState.running,
    EventType.succeeded: JobState.succeeded,
    EventType.failed: JobState.failed,
    EventType.cancelled: JobState.cancelled,
}


def transition(current: JobState | str, event: EventType | str) -> JobState | None:
    """The state a job in `current` moves to when `event` happens to it, or None when the event
    must leave the job as it is (it is finished, or the event carries no state)."""
    current, event = JobState(current), EventType(event)
    if current.finished:
        return None  # finished is final: a late or duplicate event never reopens a job
    return _TARGET.get(event)


class Outcome(BaseModel):
    """How one job ended: what `outcome.json` holds and what the final event announces. Read back
    from the store or from Kafka it is validated like any outside input (bounded fields).

    reason: for failed / cancelled, what a user reads ("timeout", "out_of_memory", the trainer's
    failure paragraph, ...); detail: more for an operator.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    state: JobState
    reason: str | None = Field(None, max_length=MAX_REASON)
    detail: str | None = Field(None, max_length=MAX_REASON)
    model_name: str | None = Field(None, pattern=MODEL_NAME_PATTERN)
    model_version: int | None = Field(None, ge=1, le=2**31 - 1)
    metrics: dict[Annotated[str, StringConstraints(max_length=128)], float | None] = Field(default_factory=dict, max_length=256)
    outputs: list[Annotated[str, StringConstraints(max_length=255)]] = Field(default_factory=list, max_length=256)

    @field_validator("state")
    @classmethod
    def _finished(cls, state: JobState) -> JobState:
        if not state.finished:
            raise ValueError(f"an outcome is a finished state, not {state}")
        return state

    @field_validator("reason", "detail", mode="before")
    @classmethod
    def _clip(cls, text):
        return text[:MAX_REASON] if isinstance(text, str) else text

    @classmethod
    def succeeded(cls, **fields) -> "Outcome":
        return cls(state=JobState.succeeded, **fields)

    @classmethod
    def failed(cls, reason: str, detail: str | None = None) -> "Outcome":
        return cls(state=JobState.failed, reason=reason, detail=detail)

    @classmethod
    def cancelled(cls, reason: str = "cancelled") -> "Outcome":
        return cls(state=JobState.cancelled, reason=reason)

    @property
    def event(self) -> EventType:
        return EventType(self.state.value)

    def record(self) -> dict[str, Any]:
        """As stored in outcome.json (unset fields left out)."""
        return self.model_dump(mode="json", exclude_defaults=True) | {"state": self.state.value}

    def event_data(self) -> dict[str, Any]:
        """The data of the final event on `retrain.job-events`."""
        return {k: v for k, v in self.record().items() if k != "state"}

    @classmethod
    def from_event(cls, event: EventType, data: dict[str, Any]) -> "Outcome":
        return cls.model_validate({**data, "state": JobState(EventType(event).value)})
