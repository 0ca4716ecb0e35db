"""Publishing job events, and turning trainer output into them."""

import json
from typing import Any

from confluent_kafka import Producer

from jobs.events import EventType, JobEvent
from jobs.kafka import send


class EventPublisher:
    def __init__(self, producer: Producer, topic: str):
        self.producer, self.topic = producer, topic

    def emit(self, job_id: str, type: EventType, wait: bool = False, **data: Any) -> None:
        """Progress and logs go out asynchronously; outcomes are sent with wait=True so the offset
        is committed only after the broker has them."""
        event = JobEvent(job_id=job_id, type=type, data=data)
        if wait:
            send(self.producer, self.topic, job_id, event)
        else:
            self.producer.produce(self.topic, key=job_id.encode(), value=event.model_dump_json().encode())
            self.producer.poll(0)


def parse_trainer_line(line: str) -> tuple[EventType, dict]:
    """The contract: one JSON object per line is progress; anything else is a log line."""
    stripped = line.strip()
    if stripped.startswith("{"):
        try:
            value = json.loads(stripped)
        except ValueError:
            value = None
        if isinstance(value, dict):
            return EventType.progress, value
    return EventType.log, {"line": line}
