"""GET /v1/jobs/{id}/events: a job's events as Server-Sent Events (text/event-stream).

Each message is `id: <seq>` and `data: <one JSON event>`, the event being
{"type": "started" | "progress" | "succeeded" | "failed" | "cancelled", "time": ..., "job_id": ...,
plus its data: worker and attempt; epoch, epochs, step, metrics and phase; model_version,
metrics and reason}. The job's past events come first (from the API's `job_events` table, kept
by api/job_events.py), then new ones as they are applied; the stream ends after the final event
(or at once for a finished job whose events are all sent). A client that reconnects with
`Last-Event-ID: <seq>` gets the events after that one, as browsers' EventSource does by itself.

The stream holds no thread and no database session while it waits: each look for new events is
one short query in the thread pool, every `event_streams_poll_s`. Open streams are bounded by
`event_streams_max` (503 beyond), and a comment line every `event_streams_keepalive_s` keeps
proxies from closing an idle one.
"""

import asyncio
import json
import re
from collections.abc import AsyncIterator

from fastapi import HTTPException, status
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from api.db import Database, Job, JobEventRecord
from jobs.events import JobState
from jobs.settings import Settings

BATCH = 500
FINAL = {state.value for state in JobState if state.finished}
_EVENT_ID = re.compile(r"[0-9]{1,18}")


class StreamSlots:
    """The open streams of one API process, bounded."""

    def __init__(self, limit: int):
        self.limit, self.open = limit, 0

    def take(self) -> None:
        if self.open >= self.limit:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, headers={"Retry-After": "5"},
                                detail={"field": "events", "error": f"{self.limit} event streams are open; try again later"})
        self.open += 1

    def give_back(self) -> None:
        self.open -= 1


def parse_last_event_id(value: str | None) -> int:
    if value is None or value == "":
        return 0
    if not _EVENT_ID.fullmatch(value.strip()):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            detail={"field": "Last-Event-ID", "error": "not an event id this API gave out"})
    return int(value)


def _next_batch(db: Database, job_id: str, after: int) -> tuple[bool, list[JobEventRecord]]:
    with db.sessions() as session:
        # The job's state first: a final event is committed with the row's final state, so a
        # finished row read here means the events read next include the final one.
        finished = JobState(session.scalar(select(Job.state).where(Job.id == job_id))).finished
        rows = session.scalars(
            select(JobEventRecord).where(JobEventRecord.job_id == job_id, JobEventRecord.seq > after)
            .order_by(JobEventRecord.seq).limit(BATCH)).all()
    return finished, list(rows)


def _message(record: JobEventRecord) -> str:
    event = {**record.data, "type": record.type, "time": record.time.isoformat(), "job_id": record.job_id}
    return f"id: {record.seq}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"


async def job_event_stream(db: Database, settings: Settings, slots: StreamSlots, job_id: str, after: int,
                           disconnected) -> AsyncIterator[str]:
    """The SSE text of one job's events after `after`; gives its slot back when it ends."""
    try:
        waited = 0.0
        while True:
            finished, batch = await run_in_threadpool(_next_batch, db, job_id, after)
            for record in batch:
                yield _message(record)
                after = record.seq
                if record.type in FINAL:
                    return
            if batch:
                waited = 0.0
                continue
            if finished or await disconnected():
                return
            await asyncio.sleep(settings.event_streams_poll_s)
            waited += settings.event_streams_poll_s
            if waited >= settings.event_streams_keepalive_s:
                waited = 0.0
                yield ": keep-alive\n\n"
    finally:
        slots.give_back()
