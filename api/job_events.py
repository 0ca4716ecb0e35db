"""How the API learns what happens to jobs: it consumes `retrain.job-events` and folds each event
into the job record. Applying an event twice changes nothing, and a finished job stays finished."""

import logging
import threading

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.db import Database, Job
from jobs.events import STATE_AFTER, EventType, JobEvent, JobState
from jobs.kafka import make_consumer
from jobs.settings import Settings

log = logging.getLogger(__name__)


def apply_event(session: Session, event: JobEvent) -> None:
    job = session.scalar(select(Job).where(Job.id == event.job_id))
    if job is None or event.type in (EventType.accepted, EventType.log):
        return
    if JobState(job.state).finished:
        return  # late or duplicate events never reopen a finished job
    data = event.data
    job.state = STATE_AFTER[event.type]
    job.updated_at = event.time
    if event.type == EventType.started:
        job.started_at = event.time
        job.worker = data.get("worker")
        job.attempts += 1
    elif event.type == EventType.progress:
        job.epoch, job.epochs, job.step = data.get("epoch"), data.get("epochs"), data.get("step")
        if data.get("metrics"):
            job.metrics = {**(job.metrics or {}), **data["metrics"]}
    elif event.type == EventType.succeeded:
        job.model_version = data.get("model_version")
        job.outputs = data.get("outputs") or []
        job.metrics = data.get("metrics") or job.metrics
        job.finished_at = event.time
    elif event.type in (EventType.failed, EventType.cancelled):
        job.error = data.get("reason")
        job.finished_at = event.time
    session.commit()


class JobEventsConsumer(threading.Thread):
    def __init__(self, db: Database, settings: Settings):
        super().__init__(name="job-events", daemon=True)
        self.db, self.settings = db, settings
        self.stopping = threading.Event()

    def run(self) -> None:
        consumer = make_consumer(self.settings, self.settings.api_events_group)
        consumer.subscribe([self.settings.topic_events])
        try:
            while not self.stopping.is_set():
                # Block for the first event only, then take whatever else is already there.
                first = consumer.poll(0.5)
                if first is None:
                    continue
                messages = [first, *consumer.consume(num_messages=500, timeout=0)]
                with self.db.sessions() as session:
                    for message in messages:
                        if message.error():
                            log.warning("job events: %s", message.error())
                            continue
                        try:
                            apply_event(session, JobEvent.model_validate_json(message.value()))
                        except ValidationError as err:
                            log.error("job events: unreadable event at offset %s: %s", message.offset(), err)
                # Committed after the records are updated: a crash re-applies, never skips.
                consumer.commit(asynchronous=False)
        finally:
            consumer.close()

    def stop(self) -> None:
        self.stopping.set()
