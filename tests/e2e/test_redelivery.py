"""At-least-once delivery without double work: a job message delivered again after its job
finished is not trained again, and a message nobody can read goes to the dead-letter topic
instead of blocking the partition."""

import json
import time
import uuid

import pytest
from confluent_kafka import Consumer, Producer

from jobs.events import EventType
from tests.conftest import submit, wait_for

pytestmark = pytest.mark.e2e


def read_topic(bootstrap: str, topic: str, until, timeout: float = 60):
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "probe-" + uuid.uuid4().hex, "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    seen = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None or message.error():
                continue
            seen.append(message)
            if until(message):
                return seen
    finally:
        consumer.close()
    raise AssertionError(f"not found on {topic} within {timeout} s ({len(seen)} messages read)")


def test_a_finished_job_delivered_again_is_not_trained_again(service, api, keyword_data, settings):
    spec = {"task": "audio_classification", "model_name": "redelivered", "hyperparameters": {"epochs": 2}}
    job_id = submit(api, spec, keyword_data["csv"], keyword_data["zip"]).json()["id"]
    job = wait_for(api, job_id)
    assert job["state"] == "succeeded"

    # Deliver the very same job message again, as Kafka may after a rebalance.
    original = read_topic(settings.kafka_bootstrap, settings.topic_jobs, lambda m: m.key() == job_id.encode())[-1]
    produced_at = int(time.time() * 1000)
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    producer.produce(settings.topic_jobs, key=original.key(), value=original.value())
    producer.flush(10)

    # The worker answers with the recorded outcome again, and starts nothing.
    def announced_again(message):
        event = json.loads(message.value())
        return event["job_id"] == job_id and event["type"] == EventType.succeeded and message.timestamp()[1] >= produced_at

    events = read_topic(settings.kafka_bootstrap, settings.topic_events, announced_again)
    started = [m for m in events if json.loads(m.value())["job_id"] == job_id and json.loads(m.value())["type"] == "started"]
    assert len(started) == 1
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert (job["state"], job["attempts"]) == ("succeeded", 1)
    assert len(api.get("/v1/models/redelivered/versions").json()) == 1


def test_an_unreadable_message_goes_to_the_dead_letter_topic(service, api, keyword_data, settings):
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    producer.produce(settings.topic_jobs, key=b"garbage", value=b"{this is not a job")
    producer.flush(10)
    dead = read_topic(settings.kafka_bootstrap, settings.topic_dlq, lambda m: m.key() == b"garbage")[-1]
    letter = json.loads(dead.value())
    assert letter["topic"] == settings.topic_jobs and "not a valid job message" in letter["reason"]
    assert letter["value"] == "{this is not a job"
    # The worker goes on taking jobs.
    spec = {"task": "audio_classification", "model_name": "after-garbage", "hyperparameters": {"epochs": 1}}
    job_id = submit(api, spec, keyword_data["csv"], keyword_data["zip"]).json()["id"]
    assert wait_for(api, job_id)["state"] == "succeeded"
