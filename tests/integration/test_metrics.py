"""GET /metrics of the API on the real Kafka and MinIO: the job counts an operator graphs move with
real submissions and cancels, and requests are counted by route template."""

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import in_process_api, isolated
from tests.integration.test_hostile_requests import post

pytestmark = pytest.mark.integration


def samples(client) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def test_jobs_by_state_and_requests_by_route(settings, tmp_path_factory, clips):
    with in_process_api(isolated(settings, tmp_path_factory, "metrics")) as client:
        before = samples(client)
        assert before[("retrain_jobs", (("state", "queued"),))] == 0
        job_id = post(client, clips, {"task": "audio_classification", "model_name": "metrics"}).raise_for_status().json()["id"]
        client.get(f"/v1/jobs/{job_id}").raise_for_status()
        client.get("/v1/jobs/no-such-job")
        after = samples(client)
        assert after[("retrain_jobs", (("state", "queued"),))] == 1
        assert after[("retrain_http_requests_total", (("method", "POST"), ("route", "/v1/jobs"), ("status", "202")))] == 1
        # The route's template, not the id a client sent: one series however many jobs.
        assert after[("retrain_http_requests_total", (("method", "GET"), ("route", "/v1/jobs/{job_id}"), ("status", "200")))] == 1
        assert after[("retrain_http_requests_total", (("method", "GET"), ("route", "/v1/jobs/{job_id}"), ("status", "404")))] == 1
        client.post(f"/v1/jobs/{job_id}/cancel").raise_for_status()
        final = samples(client)
        assert final[("retrain_jobs", (("state", "queued"),))] == 0
        assert final[("retrain_jobs", (("state", "cancelled"),))] == 1
