"""Tenants on the real service: a job submitted with another tenant's key is trained by the worker
into that tenant's models; the local tenant neither lists it nor reaches it."""

import httpx
import pytest

from tests.conftest import bearer, submit, wait_for

pytestmark = pytest.mark.e2e


def test_a_tenant_s_job_makes_a_version_of_that_tenant_s_model(api, service, keyword_data):
    created = api.post("/v1/admin/keys", json={"tenant": "acme-e2e", "role": "submit"}).raise_for_status().json()
    with httpx.Client(base_url=service.api_url, headers=bearer(created["key"]), timeout=60) as acme:
        spec = {"task": "audio_classification", "model_name": "tenant-e2e", "hyperparameters": {"epochs": 1, "batch_size": 16}}
        response = submit(acme, spec, keyword_data["csv"], keyword_data["zip"])
        assert response.status_code == 202, response.text
        job = wait_for(acme, response.json()["id"])
        assert job["state"] == "succeeded", job["error"]
        assert acme.get("/v1/models/tenant-e2e/versions/1").json()["job_id"] == job["id"]
        assert acme.get(f"/v1/jobs/{job['id']}/artifact").status_code == 200
    # The local stack's own key (tenant local): not its job, not its model.
    assert api.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert api.get("/v1/models/tenant-e2e/versions").status_code == 404
    assert "tenant-e2e" not in [m["name"] for m in api.get("/v1/models").json()]
