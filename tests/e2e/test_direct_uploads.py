"""Direct uploads (POST /v1/uploads) on the real service: the archive goes straight to MinIO with
the presigned form, the job names it by id, the worker trains on it. MinIO itself refuses another
key, another size and a late upload; the API refuses an id that is not the caller's tenant's or
has nothing behind it; a refused job leaves the upload for a corrected submission."""

import io
import json

import httpx
import pytest
from minio import Minio
from minio.error import S3Error

from tests.conftest import bearer, wait_for

pytestmark = pytest.mark.e2e


def new_upload(client: httpx.Client, filename: str, size: int) -> dict:
    response = client.post("/v1/uploads", json={"filename": filename, "size": size})
    assert response.status_code == 201, response.text
    return response.json()


def send(slot: dict, data: bytes, fields: dict | None = None) -> httpx.Response:
    """The client's side of a direct upload: the form's fields, then the file, POSTed to MinIO."""
    return httpx.post(slot["url"], data=fields or slot["fields"], files={"file": ("upload", data)}, timeout=60)


def submit_with_upload(client: httpx.Client, spec: dict, csv: bytes, upload_id: str) -> httpx.Response:
    return client.post("/v1/jobs", data={"spec": json.dumps(spec), "audio": upload_id},
                       files={"dataset": ("dataset.csv", csv, "text/csv")})


SPEC = {"task": "audio_classification", "model_name": "direct-upload-e2e", "hyperparameters": {"epochs": 1, "batch_size": 16}}


def test_a_job_trains_on_an_archive_uploaded_straight_to_minio(api, keyword_data):
    archive = keyword_data["zip"].read_bytes()
    slot = new_upload(api, "train clips.zip", len(archive))
    assert slot["fields"]["key"].startswith(f"uploads/local/{slot['id']}/") and slot["fields"]["key"].endswith("/train_clips.zip")
    assert send(slot, archive).status_code == 204

    # A CSV that names a clip the archive lacks: refused, naming the row; the upload stays.
    csv = keyword_data["csv"].read_bytes()
    header, first, *rest = csv.decode().splitlines(keepends=True)
    missing = header + first.replace(".wav", "-not-there.wav", 1) + "".join(rest)
    refused = submit_with_upload(api, SPEC, missing.encode(), slot["id"])
    assert refused.status_code == 422 and refused.json()["detail"]["row"] == 2, refused.text

    response = submit_with_upload(api, SPEC, csv, slot["id"])
    assert response.status_code == 202, response.text
    job = wait_for(api, response.json()["id"])
    assert job["state"] == "succeeded", job["error"]
    assert api.get(f"/v1/jobs/{job['id']}/artifact").status_code == 200


def test_minio_takes_only_the_key_the_size_and_the_time_it_was_signed_for(api):
    slot = new_upload(api, "clips.zip", 1000)
    too_big = send(slot, b"x" * 1001)
    assert too_big.status_code == 400 and b"EntityTooLarge" in too_big.content
    assert send(slot, b"x" * 999).status_code == 400  # EntityTooSmall: exactly the size declared
    elsewhere = send(slot, b"x" * 1000, {**slot["fields"], "key": "models/someone-else/versions/1/model.tar.gz"})
    assert elsewhere.status_code == 403
    # Nothing arrived, so the id names nothing yet.
    nothing = submit_with_upload(api, SPEC, b"audio,label\na.wav,yes\n", slot["id"])
    assert nothing.status_code == 422 and nothing.json()["detail"]["field"] == "audio" and "no upload" in nothing.json()["detail"]["error"]


def test_the_api_bounds_what_it_signs(api, settings):
    over = api.post("/v1/uploads", json={"filename": "huge.zip", "size": settings.max_upload_bytes + 1})
    assert over.status_code == 413 and over.json()["detail"]["field"] == "size"
    for body in ({"filename": "a.zip"}, {"filename": "", "size": 10}, {"filename": "a.zip", "size": 0},
                 {"filename": "a.zip", "size": "10"}, {"filename": "a.zip", "size": 10, "key": "models/x"}):
        assert api.post("/v1/uploads", json=body).status_code == 422, body
    not_an_id = submit_with_upload(api, SPEC, b"audio,label\na.wav,yes\n", "../../models/x")
    assert not_an_id.status_code == 422 and not_an_id.json()["detail"]["field"] == "audio"
    text_model = api.post("/v1/jobs", data={"spec": json.dumps(SPEC), "model": "0" * 32},
                          files={"dataset": ("dataset.csv", b"audio,label\n", "text/csv")})
    assert text_model.status_code == 422 and text_model.json()["detail"]["field"] == "model"  # only the archives may be direct


def test_another_tenant_s_upload_is_not_found(api, service, keyword_data):
    created = api.post("/v1/admin/keys", json={"tenant": "acme-uploads", "role": "submit"}).raise_for_status().json()
    with httpx.Client(base_url=service.api_url, headers=bearer(created["key"]), timeout=60) as acme:
        archive = keyword_data["zip"].read_bytes()
        slot = new_upload(acme, "clips.zip", len(archive))
        assert slot["fields"]["key"].startswith(f"uploads/acme-uploads/{slot['id']}/")
        assert send(slot, archive).status_code == 204
    response = submit_with_upload(api, SPEC, keyword_data["csv"].read_bytes(), slot["id"])
    assert response.status_code == 422 and response.json()["detail"]["field"] == "audio" and "no upload" in response.json()["detail"]["error"]


def test_the_worker_reads_an_upload_only_as_it_was_checked(service):
    """The ETag the API checked pins what the worker downloads (models_store's If-Match)."""
    from models_store.store import ModelStore

    root = Minio(service.s3_endpoint, access_key=service.s3_access_key, secret_key=service.s3_secret_key, secure=False)
    store = ModelStore(root, service.env().get("RETRAIN_S3_BUCKET", "retrain"))
    key = "uploads/local/" + "e" * 32 + "/clips.zip"
    store.put_stream(key, io.BytesIO(b"checked"), 7)
    checked_etag = store.find_upload("local", "e" * 32)[2]
    store.put_stream(key, io.BytesIO(b"swapped"), 7)
    with pytest.raises(S3Error) as err:
        b"".join(store.stream(key, etag=checked_etag))
    assert err.value.code == "PreconditionFailed"
    assert b"".join(store.stream(key, etag=store.find_upload("local", "e" * 32)[2])) == b"swapped"
    store.delete(key)


def test_the_readme_shell_example_runs_as_written(service, api, keyword_data, tmp_path):
    """README.md's curl + jq lines for a direct upload, run by bash against this stack."""
    import re
    import shutil
    import subprocess
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    script = re.search(r"\*\*Direct uploads.*?```bash\n(.*?)```", readme, re.S).group(1)
    assert "/v1/uploads" in script and "jq" in script
    shutil.copy(keyword_data["zip"], tmp_path / "clips.zip")
    shutil.copy(keyword_data["csv"], tmp_path / "dataset.csv")
    env = {"PATH": "/usr/bin:/bin", "AUTH": f"Authorization: Bearer {service.admin_key()}"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script.replace("http://127.0.0.1:8000", service.api_url)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    created = json.loads(done.stdout.strip().splitlines()[-1])  # the last command's answer: the job
    job = api.get(f"/v1/jobs/{created['id']}").json()
    assert job["spec"]["model_name"] == "keywords" and job["state"] in ("queued", "running"), job
    api.post(f"/v1/jobs/{created['id']}/cancel").raise_for_status()  # its default recipe is minutes long
    assert wait_for(api, created["id"])["state"] == "cancelled"
