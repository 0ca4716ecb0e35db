"""GET /v1/jobs/{id}/events: a job's events as Server-Sent Events, read while they are written.

The API is served by a real uvicorn (tests/conftest.py served_api) on the session's Kafka and
MinIO; a real submission makes the job, and its events reach the API over Kafka exactly as a
worker sends them (worker.events.EventPublisher)."""

import json
import threading

import httpx
import pytest

from jobs.events import EventType
from jobs.kafka import make_producer
from tests.conftest import admin_headers, isolated, served_api, wait_until
from tests.integration.test_hostile_requests import post
from worker.events import EventPublisher

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def app_settings(settings, tmp_path_factory):
    return isolated(settings, tmp_path_factory, "sse", event_streams_poll_s=0.1, event_streams_max=3)


@pytest.fixture(scope="module")
def client(app_settings):
    with served_api(app_settings) as base, httpx.Client(base_url=base, headers=admin_headers(app_settings), timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def worker_events(app_settings):
    return EventPublisher(make_producer(app_settings), app_settings.topic_events)


def read_stream(client, job_id: str, last_event_id: str | None = None, into: list | None = None) -> list[tuple[str, dict]]:
    """(id, event) of each message until the server closes the stream."""
    received = into if into is not None else []
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=60) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        event_id = None
        for line in response.iter_lines():
            if line.startswith("id: "):
                event_id = line.removeprefix("id: ")
            elif line.startswith("data: "):
                received.append((event_id, json.loads(line.removeprefix("data: "))))
    return received


def test_a_job_s_events_stream_live_then_the_stream_closes(client, clips, worker_events):
    job_id = post(client, clips, {"task": "audio_classification", "model_name": "sse"}).raise_for_status().json()["id"]
    worker_events.emit(job_id, EventType.started, worker="w1", attempt=1, wait=True)
    worker_events.emit(job_id, EventType.progress, {"epoch": 1, "epochs": 2, "metrics": {"val_accuracy": 0.5}}, wait=True)

    received: list = []
    reader = threading.Thread(target=read_stream, args=(client, job_id), kwargs={"into": received})
    reader.start()
    # The past events come first, while the job still runs ...
    wait_until(lambda: len(received) == 2, 30, "the two past events")
    assert [e["type"] for _, e in received] == ["started", "progress"]
    assert received[1][1]["epoch"] == 1 and received[1][1]["metrics"] == {"val_accuracy": 0.5}
    assert reader.is_alive()  # ... and the stream stays open for what comes next
    worker_events.emit(job_id, EventType.progress, {"epoch": 2, "epochs": 2, "metrics": {"val_accuracy": 0.75}}, wait=True)
    worker_events.emit(job_id, EventType.succeeded, {"metrics": {"accuracy": 0.8}}, model_name="sse", model_version=1, wait=True)
    reader.join(timeout=30)
    assert not reader.is_alive(), "the stream did not close after the final event"
    assert [e["type"] for _, e in received] == ["started", "progress", "progress", "succeeded"]
    assert received[3][1]["model_version"] == 1 and all(e["job_id"] == job_id for _, e in received)
    ids = [int(i) for i, _ in received]
    assert ids == sorted(ids) and len(set(ids)) == 4

    # Resuming after the second event gives the rest; a finished job's stream ends by itself.
    resumed = read_stream(client, job_id, last_event_id=received[1][0])
    assert [(i, e["type"]) for i, e in resumed] == [(i, e["type"]) for i, e in received[2:]]
    assert client.get(f"/v1/jobs/{job_id}").json()["state"] == "succeeded"


def test_an_event_applied_twice_is_streamed_once(client, clips, app_settings):
    from jobs.events import JobEvent
    from jobs.kafka import send

    job_id = post(client, clips, {"task": "audio_classification", "model_name": "sse"}).raise_for_status().json()["id"]
    producer = make_producer(app_settings)
    started = JobEvent(job_id=job_id, type=EventType.started, data={"worker": "w1", "attempt": 1})
    for _ in range(2):  # the same event twice, as a consumer re-reading a batch after a crash sees it
        send(producer, app_settings.topic_events, job_id, started)
    send(producer, app_settings.topic_events, job_id, JobEvent(job_id=job_id, type=EventType.cancelled, data={"reason": "x"}))
    assert [e["type"] for _, e in read_stream(client, job_id)] == ["started", "cancelled"]


def test_refusals_unknown_job_bad_event_id_and_too_many_streams(client, clips):
    assert client.get("/v1/jobs/no-such-job/events").status_code == 404
    job_id = post(client, clips, {"task": "audio_classification", "model_name": "sse"}).raise_for_status().json()["id"]
    response = client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "12; DROP TABLE"})
    assert response.status_code == 422 and response.json()["detail"]["field"] == "Last-Event-ID"
    # event_streams_max=3 here: a fourth stream open at once is a 503 with Retry-After.
    streams = [client.stream("GET", f"/v1/jobs/{job_id}/events") for _ in range(3)]
    opened = [s.__enter__() for s in streams]
    try:
        assert all(r.status_code == 200 for r in opened)
        extra = client.get(f"/v1/jobs/{job_id}/events")
        assert extra.status_code == 503 and extra.headers["retry-after"]
    finally:
        for s in streams:
            s.__exit__(None, None, None)

    # Closed streams give their slots back (the server notices the disconnect within a poll),
    # while the job is still queued.
    def opens() -> bool:
        with client.stream("GET", f"/v1/jobs/{job_id}/events") as r:
            return r.status_code == 200

    wait_until(opens, 30, "a slot to be free again")
    client.post(f"/v1/jobs/{job_id}/cancel").raise_for_status()
