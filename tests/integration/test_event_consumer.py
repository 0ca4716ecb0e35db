"""The API's job-events consumer on the real Kafka: any bad event is dead-lettered and skipped,
the thread lives on, and the next good event is applied."""

import json
import time
import uuid

import pytest
from confluent_kafka import Consumer, Producer

from api.db import Database, Job
from api.job_events import JobEventsConsumer
from jobs.events import EventType, JobEvent
from jobs.kafka import ensure_topics
from tests.conftest import fresh_database

pytestmark = pytest.mark.integration

HOSTILE_EVENTS = [
    b"not json at all",
    b"[1, 2, 3]",
    b"\xff\xfe\x00garbage",
    b"",
    json.dumps({"job_id": "j1", "type": "exploded", "data": {}}).encode(),
    json.dumps({"job_id": "j1", "type": "progress", "data": {"epoch": "NaN", "metrics": {"a": "b"}}}).encode(),
    json.dumps({"job_id": "j1", "type": "progress", "data": {"step": 10**30}}).encode(),
    json.dumps({"job_id": "j1", "type": "succeeded", "data": {"model_version": {"$gt": 1}}}).encode(),
    json.dumps({"job_id": "j1", "type": "started", "time": "yesterday"}).encode(),
    json.dumps({"job_id": ["j1"], "type": "started"}).encode(),
]


def test_bad_events_are_dead_lettered_and_the_consumer_lives_on(settings, tmp_path):
    suffix = uuid.uuid4().hex[:8]
    s = settings.model_copy(update={
        "topic_jobs": f"ev-{suffix}.jobs", "topic_events": f"ev-{suffix}.events",
        "topic_control": f"ev-{suffix}.control", "topic_dlq": f"ev-{suffix}.dlq", "api_events_group": f"ev-{suffix}",
    })
    ensure_topics(s)
    db = Database(fresh_database(settings, tmp_path))
    with db.sessions() as session:
        session.add(Job(id="j1", task="audio_classification", model_name="m", spec={}, inputs={}, metrics={}))
        session.commit()
    producer = Producer({"bootstrap.servers": s.kafka_bootstrap})
    for value in HOSTILE_EVENTS:
        producer.produce(s.topic_events, key=b"j1", value=value)
    good = JobEvent(job_id="j1", type=EventType.progress, data={"epoch": 4, "epochs": 9, "metrics": {"val_loss": 0.25}})
    producer.produce(s.topic_events, key=b"j1", value=good.model_dump_json().encode())
    producer.flush(10)

    consumer = JobEventsConsumer(db, s)
    consumer.start()
    try:
        deadline = time.monotonic() + 60
        while True:
            with db.sessions() as session:
                job = session.query(Job).filter_by(id="j1").one()
            if job.epoch == 4:
                break
            assert consumer.is_alive(), "the job-events thread died"
            assert time.monotonic() < deadline, "the good event after the bad ones was never applied"
            time.sleep(0.2)
        assert (job.state, job.epochs, job.metrics) == ("running", 9, {"val_loss": 0.25})
        assert consumer.is_alive()
    finally:
        consumer.stop()
        consumer.join(10)

    dlq = Consumer({"bootstrap.servers": s.kafka_bootstrap, "group.id": f"probe-{suffix}", "auto.offset.reset": "earliest"})
    dlq.subscribe([s.topic_dlq])
    reasons = []
    deadline = time.monotonic() + 30
    while len(reasons) < len(HOSTILE_EVENTS) and time.monotonic() < deadline:
        message = dlq.poll(0.5)
        if message is not None and not message.error():
            reasons.append(json.loads(message.value())["reason"])
    dlq.close()
    assert len(reasons) == len(HOSTILE_EVENTS)
    assert all(r.startswith("not a valid job event") for r in reasons)
