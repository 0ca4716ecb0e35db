"""The service's reason to be, end to end on the real parts: a client uploads a CSV of spoken
words over HTTP, the job goes through Kafka to a worker, the trainer trains, the model lands in
MinIO, the client downloads it and uses it with onnxruntime alone on voices it never heard."""

import csv

import pytest

from tests.conftest import extract_artifact, onnx_heldout_accuracy, submit, wait_for

pytestmark = pytest.mark.e2e

# The trainer's own recipe (what a user who sets nothing gets): its run length and augmentation.
SPEC = {"task": "audio_classification", "model_name": "keywords-e2e", "hyperparameters": {"batch_size": 16, "seed": 0}}


@pytest.fixture(scope="module")
def trained(api, keyword_data):
    response = submit(api, SPEC, keyword_data["csv"], keyword_data["zip"])
    assert response.status_code == 202, response.text
    created = response.json()
    assert created["status_url"].endswith(f"/v1/jobs/{created['id']}")
    job = wait_for(api, created["id"])
    return job


def test_job_succeeds_with_a_model_version_and_honest_metrics(trained):
    assert trained["state"] == "succeeded", trained["error"]
    assert trained["model_version"] >= 1
    assert trained["started_at"] and trained["finished_at"]
    metrics = trained["metrics"]
    for name in ("accuracy", "macro_precision", "macro_recall", "macro_f1", "test_size"):
        assert name in metrics, metrics
    assert metrics["test_size"] > 0
    assert trained["progress"]["epoch"] >= 1


def test_downloaded_model_recognises_unheard_voices_with_onnxruntime_alone(api, trained, keyword_data, tmp_path):
    response = api.get(f"/v1/jobs/{trained['id']}/artifact")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/gzip"
    model_dir = extract_artifact(response.content, tmp_path / "model")
    accuracy, labels = onnx_heldout_accuracy(model_dir, keyword_data["heldout_csv"])
    print(f"held-out voices: accuracy {accuracy:.2f}")
    assert sorted(labels) == sorted({r["label"] for r in csv.DictReader(keyword_data["heldout_csv"].open())})
    # Four classes: chance is 0.25. Unheard accents are hard; the model must clearly beat chance.
    assert accuracy >= 0.5


def test_model_registry_lists_the_version_with_lineage(api, trained):
    models = {m["name"]: m for m in api.get("/v1/models").json()}
    assert models[SPEC["model_name"]]["aliases"]["latest"] == trained["model_version"]
    versions = api.get(f"/v1/models/{SPEC['model_name']}/versions").json()
    version = next(v for v in versions if v["version"] == trained["model_version"])
    assert version["job_id"] == trained["id"]
    assert version["dataset"].startswith(f"jobs/{trained['id']}/inputs/")
    assert "metrics.json" in version["files"] and any(f.endswith(".png") for f in version["files"])
    metrics = api.get(f"/v1/models/{SPEC['model_name']}/versions/latest/files/metrics.json").json()
    assert metrics["accuracy"] == trained["metrics"]["accuracy"]
    redirect = api.get(f"/v1/models/{SPEC['model_name']}/versions/{trained['model_version']}/artifact", params={"redirect": "true"})
    assert redirect.status_code == 307 and "X-Amz-Signature" in redirect.headers["location"]


def test_listing_finds_the_job_by_state(api, trained):
    page = api.get("/v1/jobs", params={"state": "succeeded", "limit": 100}).json()
    assert trained["id"] in [j["id"] for j in page["items"]]


def test_the_trainer_log_is_kept_with_the_job(api, trained):
    log = api.get(f"/v1/jobs/{trained['id']}/logs")
    assert log.status_code == 200
    # The validated progress records, as the worker took them (the run's token is not kept).
    assert 'retrain-progress {"epoch":1,' in log.text


def test_the_job_s_events_replay_as_server_sent_events(api, trained):
    from tests.integration.test_event_stream import read_stream

    events = [event for _, event in read_stream(api, trained["id"])]  # returns: the stream closes after the final event
    types = [e["type"] for e in events]
    assert types[0] == "started" and types[-1] == "succeeded" and set(types[1:-1]) == {"progress"}, types
    epochs = [e["epoch"] for e in events if e["type"] == "progress" and "epoch" in e]
    assert epochs and epochs == sorted(epochs) and epochs[-1] == trained["progress"]["epoch"]
    assert any(e.get("metrics") for e in events if e["type"] == "progress")
    assert events[-1]["model_version"] == trained["model_version"]


def test_the_api_and_the_worker_export_metrics_of_the_job(api, service, trained):
    import httpx

    from tests.integration.test_metrics import samples

    worker = {(f.name, s.name, tuple(sorted(s.labels.items()))): s.value
              for f in text_families(httpx.get(service.metrics_url("worker"), timeout=10).text) for s in f.samples}
    assert worker[("retrain_worker_capacity", "retrain_worker_capacity", ())] >= 1
    assert worker[("retrain_worker_jobs", "retrain_worker_jobs_total", (("outcome", "succeeded"),))] >= 1
    # Training throughput: one observation per epoch after the first, of a few seconds each.
    epochs = worker[("retrain_worker_epoch_seconds", "retrain_worker_epoch_seconds_count", ())]
    assert epochs >= trained["progress"]["epoch"] - 1 > 0
    assert 0 < worker[("retrain_worker_epoch_seconds", "retrain_worker_epoch_seconds_sum", ())] / epochs < 600
    assert any(name == "retrain_worker_consumer_lag" for name, _, _ in worker)
    seen = samples(api)
    assert seen[("retrain_dispatch_seconds_count", ())] >= 1
    assert seen[("retrain_job_seconds_count", (("state", "succeeded"),))] >= 1
    assert seen[("retrain_jobs", (("state", "succeeded"),))] >= 1


def test_a_retrain_of_the_model_takes_its_clips_from_the_feature_cache(api, trained, keyword_data):
    """The first job left its decoded audio in the store (models/<name>/feature-cache/); the worker
    stages it for the model's next job, whose trainer decodes none of the clips it already saw."""
    response = submit(api, {**SPEC, "hyperparameters": {"epochs": 1, "batch_size": 16, "seed": 0}},
                      keyword_data["csv"], keyword_data["zip"])
    assert response.status_code == 202, response.text
    again = wait_for(api, response.json()["id"])
    assert again["state"] == "succeeded", again["error"]
    clips = sum(1 for _ in csv.DictReader(keyword_data["csv"].open()))
    log = api.get(f"/v1/jobs/{again['id']}/logs").text
    assert f"{clips} clips (" in log and f": 0 decoded, {clips} from the feature cache" in log, log[-3000:]


def text_families(text: str):
    from prometheus_client.parser import text_string_to_metric_families

    return text_string_to_metric_families(text)
