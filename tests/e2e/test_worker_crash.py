"""Impossible to lose a job: a worker killed with SIGKILL in the middle of training takes its
trainer down with it, the job goes to the next worker, and it finishes with exactly one model
version."""

import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import submit, wait_for

pytestmark = pytest.mark.e2e

SPEC = {
    "task": "audio_classification",
    "model_name": "keywords-crash",
    # Long enough to be killed mid-way; patience = epochs so early stopping does not end it first.
    "hyperparameters": {"epochs": 25, "patience": 25, "batch_size": 16, "seed": 3},
}


def trainer_processes(workspace: Path) -> list[int]:
    """PIDs of trainer processes running in this job's workspace."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if Path(os.readlink(entry / "cwd")) == workspace:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_killed_worker_job_finishes_once_on_the_next_worker(service, api, keyword_data):
    response = submit(api, SPEC, keyword_data["csv"], keyword_data["zip"])
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]

    # Wait until it is really training (a progress event has arrived), then kill the worker.
    deadline = time.monotonic() + 300
    while True:
        job = api.get(f"/v1/jobs/{job_id}").json()
        if job["state"] == "running" and (job["progress"]["epoch"] or 0) >= 2:
            break
        assert job["state"] in ("queued", "running"), job
        assert time.monotonic() < deadline, f"never started training: {job}"
        time.sleep(0.3)
    workspace = service.workdir / job_id
    assert trainer_processes(workspace), "the trainer should be running in the job's workspace"
    # Only the worker process itself: its trainer must go down with it (PR_SET_PDEATHSIG).
    os.kill(service.pid("worker"), signal.SIGKILL)

    # The trainer dies with its worker: nothing keeps training unsupervised.
    deadline = time.monotonic() + 10
    while trainer_processes(workspace) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert trainer_processes(workspace) == []

    # Start the next worker only once the killed one is gone (else `up` sees it still running).
    deadline = time.monotonic() + 10
    while service.is_running("worker"):
        assert time.monotonic() < deadline, "the killed worker did not go away"
        time.sleep(0.1)
    service.up(["worker"])
    job = wait_for(api, job_id, timeout=600)
    assert job["state"] == "succeeded", job["error"]
    assert job["attempts"] == 2  # started once by each life of the worker

    versions = api.get(f"/v1/models/{SPEC['model_name']}/versions").json()
    assert [v["job_id"] for v in versions] == [job_id], "exactly one model version for the job"
    assert versions[0]["version"] == job["model_version"]
