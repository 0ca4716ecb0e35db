"""The API with its servers away: it starts while Kafka and MinIO are down and becomes ready
when they return; a submission while MinIO is down is a 503 with the reason (and leaves
nothing); jobs accepted while Kafka is down leave the outbox once, without duplicates, when it
returns.

These tests stop and start servers, so they run on a private Kafka and MinIO (deploy/local's
Stack on free ports, in a run dir of their own), not on the session's shared `stack`."""

import io
import json

import numpy as np
import pytest
import soundfile
from sqlalchemy import func, select

from api.db import Job, OutboxMessage
from deploy.local.stack import Stack, free_port
from jobs.settings import Settings
from tests.integration.test_bad_input import make_zip
from tests.conftest import in_process_api, wait_until, trainable_csv
from tests.integration.test_hostile_requests import keys_on

pytestmark = pytest.mark.integration

SPEC = {"task": "audio_classification", "model_name": "faults"}


@pytest.fixture(scope="module")
def private(tmp_path_factory):
    """A Kafka and a MinIO of this module's own, created stopped."""
    s = Stack(
        tmp_path_factory.mktemp("private-stack"),
        api_port=free_port(), kafka_port=free_port(), kafka_controller_port=free_port(),
        minio_port=free_port(), minio_console_port=free_port(),
    )
    yield s
    s.down()


@pytest.fixture
def app_settings(private, tmp_path):
    values = {k.removeprefix("RETRAIN_").lower(): v for k, v in private.env().items()}
    return Settings(_env_file=None, **{**values, "database_url": f"sqlite:///{tmp_path}/api.db", "s3_bucket": "faults"})


@pytest.fixture
def client(app_settings):
    with in_process_api(app_settings) as c:
        yield c


def tone(freq: float) -> bytes:
    buffer = io.BytesIO()
    t = np.arange(8000) / 16000
    soundfile.write(buffer, (0.3 * np.sin(2 * np.pi * freq * t)).astype("float32"), 16000, format="WAV")
    return buffer.getvalue()


def submit(client):
    files = {
        "dataset": ("dataset.csv", trainable_csv([("low.wav", "low"), ("high.wav", "high")]).encode(), "text/csv"),
        "audio": ("audio.zip", make_zip({"low.wav": tone(220), "high.wav": tone(880)}), "application/zip"),
    }
    return client.post("/v1/jobs", data={"spec": json.dumps(SPEC)}, files=files)


def readiness(client) -> tuple[int, dict]:
    response = client.get("/readyz")
    return response.status_code, response.json()["checks"]


def jobs_in_db(client) -> int:
    with client.app_state.db.sessions() as session:
        return session.scalar(select(func.count()).select_from(Job))


def outbox_rows(client) -> int:
    with client.app_state.db.sessions() as session:
        return session.scalar(select(func.count()).select_from(OutboxMessage))


def test_the_api_starts_with_kafka_and_minio_down_and_becomes_ready_when_they_return(private, client, app_settings):
    private.down(["kafka", "minio"])
    status, checks = readiness(client)
    assert status == 503
    assert checks["minio"].startswith("error") and checks["kafka"].startswith("error"), checks
    assert checks["bucket"].startswith("error: not created yet") and checks["topics"].startswith("error: not created yet"), checks
    assert checks["job_events"] == "error: waiting for the topics to exist", checks
    assert checks["outbox_relay"] == "ok" and checks["database"] == "ok", checks

    # MinIO down: a clear 503 naming the store, and nothing recorded.
    response = submit(client)
    assert response.status_code == 503, response.text
    assert response.json()["detail"]["field"] == "store" and "unavailable" in response.json()["detail"]["error"]
    assert client.get("/v1/models").status_code == 503
    assert jobs_in_db(client) == 0 and outbox_rows(client) == 0

    # MinIO back, Kafka still away: the bucket appears, a job is accepted and waits in the outbox.
    private.up(["minio"])
    wait_until(lambda: readiness(client)[1]["bucket"] == "ok", 60, "the bucket to be created")
    response = submit(client)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert readiness(client)[0] == 503  # Kafka is still down

    # Kafka back: topics made, the consumer started, the job's message out exactly once.
    private.up(["kafka"])
    wait_until(lambda: readiness(client)[0] == 200, 90, "the API to become ready")
    assert readiness(client)[1]["job_events"] == "ok"
    wait_until(lambda: outbox_rows(client) == 0, 60, "the outbox to drain")
    assert keys_on(app_settings, app_settings.topic_jobs) == [job_id]


def test_minio_stopped_under_a_running_api_is_a_503_then_works_again(private, client):
    private.up(["kafka", "minio"])
    wait_until(lambda: readiness(client)[0] == 200, 90, "the API to become ready")
    jobs_before = jobs_in_db(client)
    private.down(["minio"])
    response = submit(client)
    assert response.status_code == 503, response.text
    assert response.json()["detail"]["field"] == "store"
    assert response.headers["retry-after"]
    for path in ("/v1/models", "/v1/models/faults/versions", "/v1/models/faults/versions/latest"):
        assert client.get(path).status_code == 503, path
    status, checks = readiness(client)
    assert status == 503 and checks["minio"].startswith("error"), checks
    assert jobs_in_db(client) == jobs_before

    private.up(["minio"])
    wait_until(lambda: readiness(client)[0] == 200, 60, "the API to become ready again")
    assert submit(client).status_code == 202


def test_jobs_accepted_while_kafka_is_down_leave_once_when_it_returns(private, client, app_settings):
    private.up(["kafka", "minio"])
    wait_until(lambda: readiness(client)[0] == 200, 90, "the API to become ready")
    relay = client.app_state.outbox
    before = keys_on(app_settings, app_settings.topic_jobs)

    private.down(["kafka"])
    accepted = []
    for _ in range(3):
        response = submit(client)
        assert response.status_code == 202, response.text
        accepted.append(response.json()["id"])
    # The relay has produced them (they wait in the producer for the broker) and does not
    # produce them again while they wait.
    wait_until(lambda: outbox_rows(client) > 0 and len(relay.in_flight) == outbox_rows(client), 30, "the rows to be in flight")
    in_flight = set(relay.in_flight)

    private.up(["kafka"])
    wait_until(lambda: outbox_rows(client) == 0, 120, "the outbox to drain after the outage")
    keys = keys_on(app_settings, app_settings.topic_jobs)
    assert sorted(keys) == sorted([*before, *accepted]), "each job's message exactly once"
    assert in_flight and relay.in_flight == set()
    assert relay.is_alive()
