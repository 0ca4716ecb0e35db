"""How the API learns what happens to jobs: it consumes `retrain.job-events` and folds each event
into the job record. This is the one place the API changes a job's row; the rule it follows is
`jobs.lifecycle.transition` (a finished job stays finished; applying an event twice changes
nothing).

Events come from workers, whose data partly comes from trainers (outside code): each event's data
is validated for its type before it touches a column, and an event that fails is logged, sent to
the dead-letter topic with the reason, and skipped. Nothing an event holds stops the consumer.
"""

import json
import logging
import threading
from collections.abc import Callable

from pydantic import BaseModel, Field, ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.db import Database, Job, JobEventRecord, OutboxMessage
from jobs.events import EventType, JobEvent, ProgressRecord
from jobs.kafka import make_consumer, make_producer
from jobs.lifecycle import Outcome, transition
from jobs.settings import Settings
from models_store import ModelStore

log = logging.getLogger(__name__)

# Progress events kept per job for the replay of GET /v1/jobs/{id}/events (a trainer may report
# every step); beyond it the row still follows each one, and started / final events are always kept.
MAX_PROGRESS_EVENTS_PER_JOB = 5000


class Started(BaseModel):
    worker: str | None = Field(None, max_length=128)
    attempt: int | None = Field(None, ge=1, le=1_000_000)


def apply_event(session: Session, event: JobEvent) -> Job | None:
    """Fold one event into its job's row and commit; returns the row when the event changed it.
    Raises ValidationError when the event's data is not what its type promises (nothing is
    changed then)."""
    # The row locked (PostgreSQL; SQLite writes one at a time anyway): two API replicas applying
    # the same event during a rebalance apply it one after the other, and the second changes nothing.
    job = session.scalar(select(Job).where(Job.id == event.job_id).with_for_update())
    if job is None:
        return None
    state = transition(job.state, event.type)
    if state is None:
        return None
    data = event.data
    if event.type == EventType.started:
        started = Started.model_validate(data)
        job.started_at, job.worker = event.time, started.worker
        job.attempts = started.attempt or job.attempts + 1
        kept = started.model_dump(exclude_none=True)
    elif event.type == EventType.progress:
        progress = ProgressRecord.model_validate({k: v for k, v in data.items() if k in ProgressRecord.model_fields})
        job.epoch, job.epochs, job.step = progress.epoch, progress.epochs, progress.step
        if progress.metrics:
            job.metrics = {**(job.metrics or {}), **progress.metrics}
        kept = progress.model_dump(exclude_none=True)
    else:  # succeeded, failed, cancelled
        outcome = Outcome.from_event(event.type, data)
        job.model_version = outcome.model_version
        job.outputs = outcome.outputs
        job.metrics = outcome.metrics or job.metrics
        job.error = outcome.reason
        job.finished_at = event.time
        kept = outcome.event_data()
    job.state, job.updated_at = state, event.time
    _keep(session, event, kept)
    session.commit()
    return job


def _keep(session: Session, event: JobEvent, data: dict) -> None:
    """The event, with its validated data, for the job's event stream; an event applied again
    (the consumer re-reads a batch after a crash) is kept once."""
    same = select(JobEventRecord.seq).where(
        JobEventRecord.job_id == event.job_id, JobEventRecord.type == event.type, JobEventRecord.time == event.time)
    if session.scalar(same.limit(1)) is not None:
        return
    if event.type == EventType.progress:
        kept = session.scalar(select(func.count()).select_from(JobEventRecord).where(
            JobEventRecord.job_id == event.job_id, JobEventRecord.type == EventType.progress))
        if kept >= MAX_PROGRESS_EVENTS_PER_JOB:
            return
    session.add(JobEventRecord(job_id=event.job_id, type=event.type.value, time=event.time, data=data))


def settle(session: Session, store: ModelStore, settings: Settings, job_id: str, outcome: Outcome) -> Outcome:
    """The API ends a job itself (a cancel; a job message Kafka refuses for good). The outcome
    goes to the store unless the job has one already (first writer wins, so a worker finishing
    at the same moment and this never disagree), its event goes out through the outbox for
    everyone else, and the row follows it here at once. Returns the job's outcome: this one, or
    the one that was there first."""
    final = store.record_job_outcome(job_id, outcome)
    event = JobEvent(job_id=job_id, type=final.event, data=final.event_data())
    session.add(OutboxMessage(topic=settings.topic_events, key=job_id, value=event.model_dump_json()))
    apply_event(session, event)  # commits, with whatever else the caller added to the session
    return final


class JobEventsConsumer(threading.Thread):
    """Applies `retrain.job-events` to the job rows, for as long as the API runs. Kafka away is
    waited out (the client reconnects); a bad event is dead-lettered and skipped; any other
    error is logged and the batch retried, so the thread only ends when the API stops."""

    def __init__(self, db: Database, settings: Settings, on_change: Callable[[Job], None] | None = None):
        super().__init__(name="job-events", daemon=True)
        self.db, self.settings, self.on_change = db, settings, on_change
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self._consume()
            except Exception:
                log.exception("job events: consumer failed; starting it again")
                self.stopping.wait(2.0)

    def _consume(self) -> None:
        consumer = make_consumer(self.settings, self.settings.api_events_group)
        producer = make_producer(self.settings)
        consumer.subscribe([self.settings.topic_events])
        try:
            while not self.stopping.is_set():
                # Block for the first event only, then take whatever else is already there.
                first = consumer.poll(0.5)
                if first is None:
                    continue
                for message in [first, *consumer.consume(num_messages=500, timeout=0)]:
                    if message.error():
                        log.warning("job events: %s", message.error())
                        continue
                    self._apply(message, producer)
                # Committed after the records are updated: a crash re-applies, never skips.
                consumer.commit(asynchronous=False)
        finally:
            consumer.close()
            producer.flush(5)

    def _apply(self, message, producer) -> None:
        try:
            event = JobEvent.model_validate_json(message.value() or b"")
            with self.db.sessions() as session:
                changed = apply_event(session, event)
        except (ValidationError, ValueError, TypeError) as err:
            reason = f"not a valid job event: {err}"[:2000]
            log.error("job events: offset %s skipped: %s", message.offset(), reason)
            value = {"reason": reason, "topic": message.topic(), "partition": message.partition(), "offset": message.offset(),
                     "value": (message.value() or b"")[:64 * 1024].decode("utf-8", "replace")}
            producer.produce(self.settings.topic_dlq, key=message.key(), value=json.dumps(value).encode())
            producer.poll(0)
            return
        if changed is not None and self.on_change is not None:
            try:
                self.on_change(changed)  # the API's metrics: never a reason to dead-letter an applied event
            except Exception:
                log.exception("job events: on_change failed for job %s", changed.id)

    def stop(self) -> None:
        self.stopping.set()
