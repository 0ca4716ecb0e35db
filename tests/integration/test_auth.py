"""API keys and roles on the in-process API (real Kafka and MinIO): no key or a bad one is a 401,
a role that does not allow the call a 403; an admin makes, lists and revokes keys over HTTP; keys
are stored only as hashes; who submitted, cancelled, moved an alias and downloaded is audited."""

import hashlib
import json
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from tests.conftest import in_process_api, isolated
from tests.integration.test_hostile_requests import post

pytestmark = pytest.mark.integration

SPEC = {"task": "audio_classification", "model_name": "auth"}


@pytest.fixture(scope="module")
def app_settings(settings, tmp_path_factory):
    return isolated(settings, tmp_path_factory, "auth")


@pytest.fixture(scope="module")
def admin(app_settings):
    with in_process_api(app_settings, ready=True) as client:
        yield client


def as_key(admin, key: str | None) -> TestClient:
    client = TestClient(admin.app)
    client.headers.pop("Authorization", None)
    if key is not None:
        client.headers["Authorization"] = f"Bearer {key}"
    return client


def make_key(admin, tenant: str, role: str, **fields) -> dict:
    response = admin.post("/v1/admin/keys", json={"tenant": tenant, "role": role, **fields})
    assert response.status_code == 201, response.text
    return response.json()


def test_no_key_or_a_bad_one_is_a_401_and_health_needs_none(admin):
    anonymous = as_key(admin, None)
    for method, path in (("GET", "/v1/jobs"), ("GET", "/v1/models"), ("POST", "/v1/jobs"), ("GET", "/v1/admin/keys")):
        response = anonymous.request(method, path)
        assert response.status_code == 401, (path, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["detail"]["field"] == "Authorization"
    assert anonymous.get("/healthz").status_code == 200
    for bad in ("nonsense", "rtk_0123456789abcdef_" + "A" * 43):
        assert as_key(admin, bad).get("/v1/jobs").status_code == 401
    assert anonymous.get("/v1/jobs", headers={"Authorization": "Basic dXNlcjpwYXNz"}).status_code == 401


def test_roles_allow_what_they_say(admin, clips):
    reader = as_key(admin, make_key(admin, "acme", "read")["key"])
    submitter = as_key(admin, make_key(admin, "acme", "submit", name="ci")["key"])
    assert reader.get("/v1/jobs").status_code == 200
    refused = post(reader, clips, SPEC)
    assert refused.status_code == 403 and "needs submit" in refused.json()["detail"]["error"]
    assert reader.post("/v1/admin/keys", json={"tenant": "acme", "role": "admin"}).status_code == 403
    job_id = post(submitter, clips, SPEC).raise_for_status().json()["id"]
    assert reader.get(f"/v1/jobs/{job_id}").status_code == 200
    assert reader.post(f"/v1/jobs/{job_id}/cancel").status_code == 403
    assert submitter.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    assert submitter.get("/v1/admin/audit").status_code == 403


def test_keys_are_shown_once_stored_hashed_listed_and_revoked(admin, app_settings):
    created = make_key(admin, "acme", "read", name="dashboard")
    assert created["key"].startswith(f"rtk_{created['id']}_") and created["tenant"] == "acme"
    listed = {k["id"]: k for k in admin.get("/v1/admin/keys", params={"tenant": "acme"}).json()}
    assert created["id"] in listed and "key" not in listed[created["id"]] and "secret_hash" not in listed[created["id"]]
    engine = sa.create_engine(app_settings.database_url)
    with engine.connect() as connection:
        stored = repr(connection.execute(sa.text("SELECT * FROM api_keys")).all())
    engine.dispose()
    secret = created["key"].split("_", 2)[2]  # rtk_<id>_<secret>
    assert secret not in stored and hashlib.sha256(secret.encode()).hexdigest() in stored  # only the hash is kept
    client = as_key(admin, created["key"])
    assert client.get("/v1/jobs").status_code == 200
    assert admin.delete(f"/v1/admin/keys/{created['id']}").status_code == 204
    assert client.get("/v1/jobs").status_code == 401  # at once on this replica (others within auth_cache_s)
    assert admin.delete(f"/v1/admin/keys/{created['id']}").status_code == 404


def test_an_expired_key_is_refused(admin):
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    assert as_key(admin, make_key(admin, "acme", "read", expires_at=past)["key"]).get("/v1/jobs").status_code == 401
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    assert as_key(admin, make_key(admin, "acme", "read", expires_at=future)["key"]).get("/v1/jobs").status_code == 200
    response = admin.post("/v1/admin/keys", json={"tenant": "Not A Tenant!", "role": "read"})
    assert response.status_code == 422 and response.json()["detail"]["field"] == "tenant"


def test_the_audit_log_says_who_did_what(admin, clips):
    key = make_key(admin, "globex", "submit")
    submitter = as_key(admin, key["key"])
    job_id = post(submitter, clips, SPEC).raise_for_status().json()["id"]
    submitter.post(f"/v1/jobs/{job_id}/cancel").raise_for_status()
    entries = admin.get("/v1/admin/audit", params={"tenant": "globex"}).json()
    assert [(e["action"], e["resource"], e["key_id"]) for e in entries[:2]] == [
        ("job.cancel", job_id, key["id"]), ("job.submit", job_id, key["id"])]
    assert entries[1]["detail"]["model_name"] == "auth"
    created = admin.get("/v1/admin/audit", params={"action": "key.create"}).json()
    assert any(e["resource"] == key["id"] and e["detail"]["tenant"] == "globex" for e in created)


def test_another_tenant_s_jobs_answer_404_and_are_not_listed(admin, clips):
    acme = as_key(admin, make_key(admin, "acme", "submit")["key"])
    globex = as_key(admin, make_key(admin, "globex", "submit")["key"])
    job_id = post(acme, clips, SPEC).raise_for_status().json()["id"]
    assert acme.get(f"/v1/jobs/{job_id}").status_code == 200
    for method, path in (("GET", f"/v1/jobs/{job_id}"), ("GET", f"/v1/jobs/{job_id}/events"), ("GET", f"/v1/jobs/{job_id}/logs"),
                         ("GET", f"/v1/jobs/{job_id}/artifact"), ("POST", f"/v1/jobs/{job_id}/cancel")):
        response = globex.request(method, path)
        assert response.status_code == 404, (path, response.text)  # its existence does not leak
        assert response.json()["detail"] == {"field": "job_id", "error": f"no job {job_id!r}"}
    assert job_id not in [j["id"] for j in globex.get("/v1/jobs", params={"limit": 500}).json()["items"]]
    assert job_id in [j["id"] for j in acme.get("/v1/jobs", params={"limit": 500}).json()["items"]]
    acme.post(f"/v1/jobs/{job_id}/cancel").raise_for_status()


def test_model_names_are_per_tenant_and_another_tenant_s_models_answer_404(admin, tmp_path):
    model, data = tmp_path / "model", tmp_path / "data"
    model.mkdir()
    data.mkdir()
    (model / "weights.bin").write_bytes(b"acme's weights")
    store = admin.app_state.store
    lineage = {"task": "audio_classification", "dataset": "d"}
    store.for_tenant("acme").publish_version("shared-name", "job-acme", model, data, lineage)  # as a worker does for acme's job
    acme = as_key(admin, make_key(admin, "acme", "submit")["key"])
    globex = as_key(admin, make_key(admin, "globex", "submit")["key"])
    assert [m["name"] for m in acme.get("/v1/models").json()] == ["shared-name"]
    assert acme.get("/v1/models/shared-name/versions/1").json()["job_id"] == "job-acme"
    assert "shared-name" not in [m["name"] for m in globex.get("/v1/models").json()]
    for method, path, body in (("GET", "/v1/models/shared-name/versions", None), ("GET", "/v1/models/shared-name/versions/1", None),
                               ("GET", "/v1/models/shared-name/versions/1/artifact", None),
                               ("PUT", "/v1/models/shared-name/aliases/production", {"version": 1})):
        assert globex.request(method, path, json=body).status_code == 404, path
    # The same name in another tenant is a model of its own, with versions of its own.
    (model / "weights.bin").write_bytes(b"globex's weights")
    store.for_tenant("globex").publish_version("shared-name", "job-globex", model, data, lineage)
    assert globex.get("/v1/models/shared-name/versions/1").json()["job_id"] == "job-globex"
    assert acme.get("/v1/models/shared-name/versions/1").json()["job_id"] == "job-acme"
    # A base model comes from the caller's tenant only.
    spec = {"task": "audio_classification", "model_name": "other", "base": {"model": "shared-name", "version": 1}}
    response = as_key(admin, make_key(admin, "initech", "submit")["key"]).post(
        "/v1/jobs", data={"spec": json.dumps(spec)}, files={"dataset": ("d.csv", b"audio,label\na.wav,x\nb.wav,y\n")})
    assert response.status_code == 422 and response.json()["detail"]["field"] == "spec.base", response.text
