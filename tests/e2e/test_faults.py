"""Faults are normal: Kafka or MinIO vanish in the middle of a job, a worker dies while it
publishes, a second worker joins (a rebalance) while jobs run. Each job still finishes exactly
once, with exactly one model version, and the worker and the API stay up through the outages.

A stack of its own (Kafka, MinIO, API, worker on free ports), since these tests stop its servers.
"""

import io
import os
import signal
import tarfile
import time

import httpx
import pytest

from deploy.local.stack import Stack, free_port
from jobs.settings import Settings
from models_store import make_store
from tests.conftest import bearer, submit, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    s = Stack(
        tmp_path_factory.mktemp("faults"),
        api_port=free_port(), kafka_port=free_port(), kafka_controller_port=free_port(),
        minio_port=free_port(), minio_console_port=free_port(),
        extra_env={
            "RETRAIN_KAFKA_SESSION_TIMEOUT_MS": "6000",
            "RETRAIN_JOB_LEASE_S": "9",  # a dead worker's job moves on within seconds
            "RETRAIN_RETRY_MAX_S": "3",
            "RETRAIN_CONCURRENCY": "2",
        },
    )
    s.up(["kafka", "minio", "api", "worker"])
    yield s
    s.down()


@pytest.fixture(scope="module")
def client(faults):
    with httpx.Client(base_url=faults.api_url, headers=bearer(faults.admin_key()), timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def store(faults):
    values = {k.removeprefix("RETRAIN_").lower(): v for k, v in faults.env().items()}
    return make_store(Settings(_env_file=None, **values))


def spec(name: str, epochs: int) -> dict:
    # patience = epochs: early stopping must not end training before the fault is injected.
    return {"task": "audio_classification", "model_name": name,
            "hyperparameters": {"epochs": epochs, "patience": epochs, "batch_size": 16, "seed": 5}}


def start(client, keyword_data, name: str, epochs: int) -> str:
    response = submit(client, spec(name, epochs), keyword_data["csv"], keyword_data["zip"])
    assert response.status_code == 202, response.text
    return response.json()["id"]


def wait_training(client, job_id: str, min_epoch: int, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] == "running" and (job["progress"]["epoch"] or 0) >= min_epoch:
            return job
        assert job["state"] in ("queued", "running"), job
        assert time.monotonic() < deadline, f"did not reach epoch {min_epoch}: {job}"
        time.sleep(0.3)


def hold_down(faults, seconds: float, alive=("worker", "api")) -> None:
    """Keep a server down for `seconds` (the outage itself), checking all the while that the
    worker and the API live through it."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for name in alive:
            assert faults.is_running(name), f"{name} exited during the outage:\n{faults.log_path(name).read_text()[-3000:]}"
        time.sleep(1.0)


def assert_one_complete_version(client, name: str, job_id: str, job: dict) -> None:
    versions = client.get(f"/v1/models/{name}/versions").json()
    assert [v["job_id"] for v in versions] == [job_id], versions
    assert versions[0]["version"] == job["model_version"]
    artifact = client.get(f"/v1/jobs/{job_id}/artifact")
    assert artifact.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(artifact.content), mode="r:gz") as tar:
        assert "model.onnx" in tar.getnames()


def test_kafka_down_for_90_s_in_the_middle_of_a_job(faults, client, keyword_data):
    job_id = start(client, keyword_data, "faults-kafka", epochs=25)
    wait_training(client, job_id, min_epoch=2)
    worker_pid = faults.pid("worker")
    faults.stop("kafka")
    hold_down(faults, 90)
    faults.up(["kafka"])
    job = wait_for(client, job_id, timeout=600)
    assert job["state"] == "succeeded", job["error"]
    assert faults.pid("worker") == worker_pid, "the same worker process carried the job through"
    assert job["attempts"] == 1, "the job ran once, not again after the outage"
    assert_one_complete_version(client, "faults-kafka", job_id, job)


def test_minio_down_around_the_end_of_training(faults, client, keyword_data):
    epochs = 6
    job_id = start(client, keyword_data, "faults-minio", epochs=epochs)
    wait_training(client, job_id, min_epoch=epochs - 1)  # the last epoch is training
    worker_pid = faults.pid("worker")
    faults.stop("minio")
    hold_down(faults, 30)  # the trainer ends and the worker tries to publish meanwhile
    faults.up(["minio"])
    job = wait_for(client, job_id, timeout=600)
    assert job["state"] == "succeeded", job["error"]
    assert faults.pid("worker") == worker_pid
    assert job["attempts"] == 1
    assert_one_complete_version(client, "faults-minio", job_id, job)


def test_worker_killed_while_publishing(faults, client, keyword_data, store):
    name = "faults-publish"
    job_id = start(client, keyword_data, name, epochs=3)
    # The first thing publishing writes is the version claim: kill the worker as soon as it is there.
    deadline = time.monotonic() + 600
    while not any(k.endswith("claim.json") for k in store.list_keys(f"models/{name}/")):
        assert time.monotonic() < deadline, "the job never started publishing"
        assert client.get(f"/v1/jobs/{job_id}").json()["state"] in ("queued", "running")
        time.sleep(0.02)
    os.kill(faults.pid("worker"), signal.SIGKILL)
    while faults.is_running("worker"):
        time.sleep(0.1)
    faults.up(["worker"])
    job = wait_for(client, job_id, timeout=600)
    assert job["state"] == "succeeded", job["error"]
    assert_one_complete_version(client, name, job_id, job)


def test_a_cancel_sent_while_no_worker_holds_the_job_is_not_lost(faults, client, keyword_data, store):
    name = "faults-cancel"
    job_id = start(client, keyword_data, name, epochs=25)
    wait_training(client, job_id, min_epoch=1)
    os.kill(faults.pid("worker"), signal.SIGKILL)  # the trainer goes down with it
    while faults.is_running("worker"):
        time.sleep(0.1)
    response = client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 202, response.text
    assert response.json()["state"] == "cancelled"
    faults.up(["worker"])  # the job's message is delivered again: the worker must not run it
    # The restarted worker takes the redelivered message and answers it with the recorded cancel.
    deadline = time.monotonic() + 120
    while f"job {job_id} already cancelled; not running it again" not in faults.log_path("worker").read_text():
        assert time.monotonic() < deadline, "the redelivered job message was never taken"
        time.sleep(0.5)
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert (job["state"], job["error"]) == ("cancelled", "cancelled by the user")
    assert store.job_outcome(job_id).state == "cancelled"
    assert client.get(f"/v1/models/{name}/versions").status_code == 404


def test_a_second_worker_joins_while_two_jobs_run(faults, client, keyword_data):
    names = [f"faults-rebalance-{i}" for i in range(4)]
    first = [start(client, keyword_data, n, epochs=8) for n in names[:2]]
    for job_id in first:
        wait_training(client, job_id, min_epoch=1)
    faults.up(["worker-2"])  # the group rebalances: partitions of running jobs may move to it
    later = [start(client, keyword_data, n, epochs=3) for n in names[2:]]
    try:
        for name, job_id in zip(names, first + later):
            job = wait_for(client, job_id, timeout=900)
            assert job["state"] == "succeeded", job["error"]
            # One run: no second worker started it while the first one lived.
            assert job["attempts"] == 1, job
            assert_one_complete_version(client, name, job_id, job)
    finally:
        faults.stop("worker-2")
    # The group rebalances again: the first worker, alone, takes every partition and a new job.
    job = wait_for(client, start(client, keyword_data, "faults-rebalance-after", epochs=1), timeout=300)
    assert job["state"] == "succeeded", job["error"]
