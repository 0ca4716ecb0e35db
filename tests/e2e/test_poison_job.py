"""A job whose trainer takes its worker down is not redelivered for ever: after
`max_job_crashes` runs that killed their worker it ends `failed` with a reason that says so."""

import time

import httpx
import pytest

from deploy.local.stack import REPO_ROOT, Stack, free_port
from tests.conftest import bearer, submit

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    s = Stack(
        tmp_path_factory.mktemp("poison"),
        api_port=free_port(), kafka_port=free_port(), kafka_controller_port=free_port(),
        minio_port=free_port(), minio_console_port=free_port(),
        extra_env={
            "RETRAIN_KAFKA_SESSION_TIMEOUT_MS": "6000",
            "RETRAIN_MAX_JOB_CRASHES": "2",
            # Every job's trainer here is the one that kills its worker.
            "RETRAIN_TRAINER_DIR": str(REPO_ROOT / "tests" / "e2e" / "poison_trainer"),
        },
    )
    s.up(["kafka", "minio", "api", "worker"])
    yield s
    s.down()


def test_a_job_that_kills_its_worker_ends_failed_after_bounded_attempts(poisoned, keyword_data):
    with httpx.Client(base_url=poisoned.api_url, headers=bearer(poisoned.admin_key()), timeout=60) as client:
        spec = {"task": "audio_classification", "model_name": "poison"}
        job_id = submit(client, spec, keyword_data["csv"], keyword_data["zip"]).json()["id"]
        restarts = 0
        deadline = time.monotonic() + 300
        while (job := client.get(f"/v1/jobs/{job_id}").json())["state"] in ("queued", "running"):
            assert time.monotonic() < deadline, f"still {job['state']} after {restarts} worker restarts"
            if not poisoned.is_running("worker"):  # the supervisor's part: start it again
                restarts += 1
                poisoned.up(["worker"])
            time.sleep(0.2)
        assert job["state"] == "failed"
        assert "poison job" in job["error"] and "took their worker down" in job["error"]
        assert restarts == 2  # two runs killed their worker; the third take failed the job
        assert client.get("/v1/models/poison/versions").status_code == 404
