"""Hostile specs and URLs get a 4xx that names the field, and leave nothing behind (no job row,
no object in the bucket, no Kafka message); a normal job still goes through afterwards. And one
row the broker refuses for good does not hold up the outbox: it is set aside, its job fails
with the reason, the next job's message leaves.

The API runs in-process against the real Kafka and MinIO of the `stack` fixture, on a bucket
and topics of its own so the test sees exactly what was left."""

import base64
import json
import time
import uuid

import pytest
from confluent_kafka import Consumer, TopicPartition
from sqlalchemy import func, select

from api.db import Job, OutboxDead, OutboxMessage
from jobs.events import JobState, utcnow
from tests.conftest import TEST_TENANT, in_process_api, isolated, wait_until, trainable_csv
from tests.integration.test_bad_input import make_zip, messages_on

pytestmark = pytest.mark.integration

SPEC = {"task": "audio_classification", "model_name": "hostile"}


@pytest.fixture(scope="module")
def app_settings(settings, tmp_path_factory):
    return isolated(settings, tmp_path_factory, "hostile")


@pytest.fixture(scope="module")
def client(app_settings):
    with in_process_api(app_settings, ready=True) as c:
        yield c


def post(client, clips, spec) -> "httpx.Response":  # noqa: F821
    csv_text = trainable_csv((name, label) for name, _, label in clips)
    files = {
        "dataset": ("dataset.csv", csv_text.encode(), "text/csv"),
        "audio": ("audio.zip", make_zip({name: data for name, data, _ in clips}), "application/zip"),
    }
    return client.post("/v1/jobs", data={"spec": spec if isinstance(spec, str) else json.dumps(spec)}, files=files)


def refused(response, status: int, field: str, says: str = "") -> dict:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert detail["field"] == field, detail
    assert says.lower() in detail["error"].lower(), detail
    return detail


def assert_nothing_left(client, app_settings):
    state = client.app_state
    assert state.store.list_keys("") == []
    with state.db.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0
        assert session.scalar(select(func.count()).select_from(OutboxMessage)) == 0
    assert messages_on(app_settings, app_settings.topic_jobs) == 0


def keys_on(settings, topic: str) -> list[str]:
    """The keys of every message on the topic, read from the beginning."""
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "probe-" + uuid.uuid4().hex,
                         "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        keys, wanted = [], 0
        assignment = []
        for p in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                assignment.append(TopicPartition(topic, p, low))
                wanted += high - low
        consumer.assign(assignment)
        deadline = time.monotonic() + 20
        while len(keys) < wanted and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and not message.error():
                keys.append(message.key().decode())
        return keys
    finally:
        consumer.close()


# ---- hostile specs ---------------------------------------------------------------------------


def test_one_megabyte_hyperparameter_value(client, app_settings, clips):
    """The issue's first finding: a spec with a ~1 MB value was accepted and jammed the outbox."""
    spec = {**SPEC, "hyperparameters": {"notes": "x" * 1_000_000}}
    refused(post(client, clips, spec), 413, "spec", says=f"limit of {app_settings.max_spec_bytes} bytes")
    assert_nothing_left(client, app_settings)


def test_hyperparameter_value_over_its_own_limit(client, app_settings, clips):
    spec = {**SPEC, "hyperparameters": {"notes": "x" * (app_settings.max_hyperparameter_value_bytes + 1)}}
    refused(post(client, clips, spec), 413, "spec.hyperparameters.notes", says=f"limit is {app_settings.max_hyperparameter_value_bytes}")
    assert_nothing_left(client, app_settings)


def test_newline_and_json_in_a_hyperparameter_name(client, app_settings, clips):
    """A name the trainer would print as a line of its own that looks like a progress record."""
    name = 'lr\n{"type": "progress", "job_id": "someone-else", "epoch": 999}'
    escaped = 'lr\\n{"type": "progress", "job_id": "someone-else", "epoch": 999}'  # the newline as \n
    detail = refused(post(client, clips, {**SPEC, "hyperparameters": {name: 1}}), 422, f"spec.hyperparameters.{escaped}", says="name must match")
    assert "\n" not in detail["field"]
    assert_nothing_left(client, app_settings)


def test_ten_thousand_hyperparameters(client, app_settings, clips):
    spec = {**SPEC, "hyperparameters": {f"h{i}": i for i in range(10_000)}}
    refused(post(client, clips, spec), 413, "spec", says="limit")
    assert_nothing_left(client, app_settings)


def test_more_hyperparameters_than_allowed(client, app_settings, clips):
    count = app_settings.max_hyperparameters + 1
    spec = {**SPEC, "hyperparameters": {f"h{i}": i for i in range(count)}}
    refused(post(client, clips, spec), 422, "spec.hyperparameters", says=f"{count} hyperparameters")
    assert_nothing_left(client, app_settings)


def test_nested_hyperparameter_value(client, app_settings, clips):
    deep = 1
    for _ in range(50):
        deep = [deep]
    refused(post(client, clips, {**SPEC, "hyperparameters": {"deep": deep}}), 422, "spec.hyperparameters.deep", says="flat")
    refused(post(client, clips, {**SPEC, "hyperparameters": {"obj": {"a": {"b": 1}}}}), 422, "spec.hyperparameters.obj", says="not dict")
    assert_nothing_left(client, app_settings)


def test_json_nested_past_the_parser_limit(client, app_settings, clips):
    text = '{"task": "audio_classification", "model_name": "hostile", "hyperparameters": {"x": ' + "[" * 5000 + "]" * 5000 + "}}"
    refused(post(client, clips, text), 422, "spec", says="recursion")
    assert_nothing_left(client, app_settings)


def test_spec_bigger_than_a_form_field_may_be(client, app_settings, clips):
    """Refused while it arrives (api/intake.py), at the spec's own bound, before any file is read."""
    spec = {**SPEC, "hyperparameters": {"notes": "x" * 2_000_000}}
    refused(post(client, clips, spec), 413, "spec", says=f"over the limit of {app_settings.max_spec_bytes} bytes")
    assert_nothing_left(client, app_settings)


def test_values_of_the_wrong_shape(client, app_settings, clips):
    cases = [
        ({"seed": 2**40}, "spec.hyperparameters.seed", "less than or equal"),
        ({"seed": -1}, "spec.hyperparameters.seed", "greater than or equal"),
        ({"note": "two\nlines"}, "spec.hyperparameters.note", "one line"),
        ({"big": 10**30}, "spec.hyperparameters.big", "64-bit"),
    ]
    for hyperparameters, field, says in cases:
        refused(post(client, clips, {**SPEC, "hyperparameters": hyperparameters}), 422, field, says=says)
    # Not JSON's numbers: Python's json writes Infinity and NaN for these.
    refused(post(client, clips, json.dumps({**SPEC, "hyperparameters": {"lr2": float("inf")}})), 422, "spec.hyperparameters.lr2", says="finite")
    assert_nothing_left(client, app_settings)


def test_bad_base_versions_and_names(client, app_settings, clips):
    for version in ("²", -1, 0, 99999999999999999999, " 3", "Production", True):
        spec = {**SPEC, "base": {"model": "hostile", "version": version}}
        refused(post(client, clips, spec), 422, "spec.base.version")
    for name in ("../../etc", "a/b", "UPPER", "x" * 64, ".hidden", "a\nb"):
        refused(post(client, clips, {**SPEC, "model_name": name}), 422, "spec.model_name", says="pattern")
        refused(post(client, clips, {**SPEC, "base": {"model": name}}), 422, "spec.base.model", says="pattern")
    refused(post(client, clips, {**SPEC, "image": "retrain/x\nFROM evil"}), 422, "spec.image", says="pattern")
    assert_nothing_left(client, app_settings)


# ---- hostile URLs ----------------------------------------------------------------------------


def test_bad_version_strings_in_urls(client, app_settings):
    for version in ("%C2%B2", "-1", "0", "000", "99999999999999999999", "1e3", "0x10", "Latest", "a" * 40, "%00"):
        for suffix in ("", "/artifact", "/files/metrics.json"):
            refused(client.get(f"/v1/models/hostile/versions/{version}{suffix}"), 422, "version")
    assert_nothing_left(client, app_settings)


def test_bad_model_names_in_urls(client, app_settings):
    for name in ("UPPER", ".hidden", "a" * 64, "%E2%80%AEevil", "a%20b"):
        refused(client.get(f"/v1/models/{name}/versions"), 422, "name")
        refused(client.get(f"/v1/models/{name}/versions/1"), 422, "name")
    # A name with a slash in it is no route at all.
    for path in ("/v1/models/..%2F..%2Fetc/versions", "/v1/models/../../etc/versions"):
        assert client.get(path).status_code == 404
    assert_nothing_left(client, app_settings)


def test_bad_cursors_and_limits(client, app_settings):
    def b64(text: str) -> str:
        return base64.urlsafe_b64encode(text.encode()).decode()

    for cursor in (b64("99999999999999999999"), b64("-1"), b64("1e9"), b64("²"), b64(" 1"), "!!!", "%00", "a" * 10_000, b64("1") + "garbage!"):
        refused(client.get("/v1/jobs", params={"cursor": cursor}), 422, "cursor")
    for limit in ("0", "-1", "501", str(10**30), "ten"):
        refused(client.get("/v1/jobs", params={"limit": limit}), 422, "limit")
    refused(client.get("/v1/jobs", params={"state": "exploded"}), 422, "state")
    assert client.get("/v1/jobs", params={"cursor": b64("5")}).json() == {"items": [], "next_cursor": None}
    assert_nothing_left(client, app_settings)


def test_bad_alias_names_and_bodies(client, app_settings):
    for alias in ("Prod", "a" * 40, "-x", "%0Aevil", "a.b"):
        refused(client.put(f"/v1/models/hostile/aliases/{alias}", json={"version": 1}), 422, "alias")
    refused(client.put("/v1/models/hostile/aliases/latest", json={"version": 1}), 422, "alias", says="moves by itself")
    for body in ({"version": 10**30}, {"version": "1"}, {"version": 0}, {"version": 1, "extra": True}, {}):
        response = client.put("/v1/models/hostile/aliases/production", json=body)
        assert response.status_code == 422, response.text
        assert response.json()["detail"]["field"].startswith("version") or response.json()["detail"]["field"] == "extra", response.text
    refused(client.put("/v1/models/hostile/aliases/production", json={"version": 1}), 404, "version", says="no version 1")
    assert_nothing_left(client, app_settings)


def test_bad_job_ids_and_output_names(client, app_settings):
    refused(client.get("/v1/jobs/" + "a" * 100), 422, "job_id")
    refused(client.get(f"/v1/jobs/{uuid.uuid4()}"), 404, "job_id")
    refused(client.get(f"/v1/jobs/{uuid.uuid4()}/outputs/" + "x" * 300), 422, "name")
    refused(client.get(f"/v1/jobs/{uuid.uuid4()}/outputs/..%2F..%2Fsecret"), 404, "path")
    # A NUL character, which PostgreSQL text cannot hold (schemathesis found the audit log's 500).
    refused(client.get("/v1/jobs/a%00b"), 422, "job_id")
    refused(client.get("/v1/admin/audit", params={"action": "job.\x00submit"}), 422, "action")
    refused(client.delete("/v1/admin/keys/ab%00cd"), 422, "key_id")
    assert_nothing_left(client, app_settings)


# ---- hostile multipart bodies (api/intake.py reads them as they arrive) ----------------------


def multipart(*parts: tuple[str, str | None, bytes], boundary: str = "b0undary", end: bool = True) -> tuple[bytes, dict]:
    """A body of (name, filename or None, data) parts, and its Content-Type header."""
    body = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    if end:
        body += f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def good_parts(clips) -> list[tuple[str, str | None, bytes]]:
    csv_text = trainable_csv((name, label) for name, _, label in clips)
    return [("spec", None, json.dumps(SPEC).encode()), ("dataset", "dataset.csv", csv_text.encode()),
            ("audio", "audio.zip", make_zip({name: data for name, data, _ in clips}))]


def test_form_fields_the_endpoint_does_not_have_or_gets_twice(client, app_settings, clips):
    body, headers = multipart(*good_parts(clips), ("script", "run.sh", b"rm -rf /"))
    refused(client.post("/v1/jobs", content=body, headers=headers), 422, "script", says="not a field of this form")
    body, headers = multipart(*good_parts(clips), ("dataset", "other.csv", b"audio,label\n"))
    refused(client.post("/v1/jobs", content=body, headers=headers), 422, "dataset", says="sent twice")
    body, headers = multipart(good_parts(clips)[0], ("dataset", None, b"audio,label\n"))
    refused(client.post("/v1/jobs", content=body, headers=headers), 422, "dataset", says="must be a file")
    body, headers = multipart(*good_parts(clips)[1:])
    refused(client.post("/v1/jobs", content=body, headers=headers), 422, "spec", says="required")
    assert_nothing_left(client, app_settings)


def test_bodies_that_are_not_a_whole_form(client, app_settings, clips):
    body, _ = multipart(*good_parts(clips))
    refused(client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"}), 422, "body", says="multipart/form-data")
    refused(client.post("/v1/jobs", content=body, headers={"Content-Type": "multipart/form-data"}), 422, "body", says="multipart/form-data")
    # Cut off inside the archive: the parts begun are not a job (their stored objects are removed).
    body, headers = multipart(*good_parts(clips), end=False)
    refused(client.post("/v1/jobs", content=body[:-100], headers=headers), 422, "body", says="ended inside a part")
    huge_header = f'--b0undary\r\nContent-Disposition: form-data; name="spec"\r\nX-Pad: {"x" * 20_000}\r\n\r\n{{}}\r\n--b0undary--\r\n'
    refused(client.post("/v1/jobs", content=huge_header.encode(), headers=headers), 422, "body", says="header size exceeded")
    assert_nothing_left(client, app_settings)


def test_a_client_that_goes_away_mid_upload_leaves_nothing(client, app_settings, clips):
    """The archive's object is begun in the store while the body arrives; the client hangs up
    halfway through: the upload is stopped and nothing stays in the bucket."""
    body, headers = multipart(*good_parts(clips)[:2], ("audio", "audio.zip", b"\0" * (3 * 1024 * 1024)), end=False)

    def hang_up_halfway():
        yield body[: len(body) // 2]
        raise ConnectionAbortedError("the client went away")

    with pytest.raises(Exception):
        client.post("/v1/jobs", content=hang_up_halfway(), headers=headers)
    wait_until(lambda: client.app_state.store.list_keys("") == [], 30, "the stored half of the upload to be removed")
    assert_nothing_left(client, app_settings)


# ---- and a normal job still goes through ----------------------------------------------------


def test_a_normal_job_still_goes_through(client, app_settings, clips):
    """Runs after the corpus above (file order): the same API takes a good job and its message
    reaches the jobs topic."""
    response = post(client, clips, {**SPEC, "hyperparameters": {"epochs": 3, "seed": 7, "channels": "16,32", "extra_list": [1, 2.5, "x", True]}})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    wait_until(lambda: job_id in keys_on(app_settings, app_settings.topic_jobs), 30, "the job's message on the jobs topic")
    assert keys_on(app_settings, app_settings.topic_jobs) == [job_id]
    wait_until(lambda: client.app_state.outbox.in_flight == set(), 10, "the outbox to settle")
    with client.app_state.db.sessions() as session:
        assert session.scalar(select(func.count()).select_from(OutboxMessage)) == 0


def test_a_spec_sent_as_a_file_is_read_like_the_field(client, app_settings, clips):
    """curl -F spec=@spec.json: accepted like the text field (after the normal job, file order)."""
    parts = good_parts(clips)
    body, headers = multipart(("spec", "spec.json", parts[0][2]), *parts[1:])
    response = client.post("/v1/jobs", content=body, headers=headers)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert sorted(client.app_state.store.list_keys(f"jobs/{job_id}/")) == [f"jobs/{job_id}/inputs/audio.zip", f"jobs/{job_id}/inputs/dataset.csv"]
    wait_until(lambda: job_id in keys_on(app_settings, app_settings.topic_jobs), 30, "the job's message on the jobs topic")


# ---- the outbox never blocks on one row ------------------------------------------------------


@pytest.fixture(scope="module")
def outbox_settings(settings, tmp_path_factory):
    # The producer allows more than the broker's 1 MiB message.max.bytes, so both kinds of
    # refusal happen: by the producer itself (over 2 MB) and by the broker (1.5 MB).
    return isolated(settings, tmp_path_factory, "outbox", outbox_max_message_bytes=2_000_000)


@pytest.fixture(scope="module")
def outbox_client(outbox_settings):
    with in_process_api(outbox_settings, ready=True) as c:
        yield c


def _stuck_job(state, settings, size: int) -> str:
    """A queued job whose outbox row is `size` bytes (as an old API without spec bounds wrote)."""
    job_id = str(uuid.uuid4())
    now = utcnow()
    with state.db.sessions() as session:
        session.add(Job(id=job_id, tenant=TEST_TENANT, state=JobState.queued, task="audio_classification", model_name="outbox",
                        spec={**SPEC, "model_name": "outbox"}, inputs={}, created_at=now, updated_at=now, metrics={}))
        value = json.dumps({"job_id": job_id, "padding": "x" * size})
        session.add(OutboxMessage(topic=settings.topic_jobs, key=job_id, value=value))
        session.commit()
    return job_id


def _assert_failed_for_size(client, job_id: str):
    wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json()["state"] == "failed", 30, f"job {job_id} to fail")
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert "could not be delivered" in job["error"] and "too large" in job["error"].lower(), job
    assert client.app_state.store.job_outcome(job_id).state == JobState.failed


def test_a_row_the_producer_refuses_does_not_hold_up_the_next_job(outbox_client, outbox_settings, clips):
    """The issue's jam: the oldest row can never be produced; the job behind it still leaves."""
    state = outbox_client.app_state
    stuck = _stuck_job(state, outbox_settings, 3_000_000)  # over the producer's 2 MB
    response = post(outbox_client, clips, {**SPEC, "model_name": "outbox"})
    assert response.status_code == 202, response.text
    good = response.json()["id"]

    wait_until(lambda: good in keys_on(outbox_settings, outbox_settings.topic_jobs), 60, "the good job's message")
    _assert_failed_for_size(outbox_client, stuck)
    assert outbox_client.get(f"/v1/jobs/{good}").json()["state"] == "queued"
    # Each message went out once: the good job's, its accepted event, the stuck job's failed event.
    assert keys_on(outbox_settings, outbox_settings.topic_jobs) == [good]
    assert sorted(keys_on(outbox_settings, outbox_settings.topic_events)) == sorted([good, stuck])
    with state.db.sessions() as session:
        dead = session.scalars(select(OutboxDead)).all()
        assert [row.key for row in dead] == [stuck] and "too large" in dead[0].error.lower()
        assert session.scalar(select(func.count()).select_from(OutboxMessage)) == 0
    assert outbox_client.get("/readyz").json()["checks"]["outbox_relay"] == "ok"


def test_a_row_the_broker_refuses_is_set_aside_and_the_next_job_flows(outbox_client, outbox_settings, clips):
    """Over the broker's message.max.bytes (1 MiB) but under the producer's: the broker's answer
    is final too, and the relay moves on."""
    state = outbox_client.app_state
    before = keys_on(outbox_settings, outbox_settings.topic_jobs)
    stuck = _stuck_job(state, outbox_settings, 1_500_000)
    _assert_failed_for_size(outbox_client, stuck)
    response = post(outbox_client, clips, {**SPEC, "model_name": "outbox"})
    assert response.status_code == 202, response.text
    good = response.json()["id"]
    wait_until(lambda: good in keys_on(outbox_settings, outbox_settings.topic_jobs), 60, "the good job's message")
    assert sorted(keys_on(outbox_settings, outbox_settings.topic_jobs)) == sorted([*before, good])
    with state.db.sessions() as session:
        assert stuck in [row.key for row in session.scalars(select(OutboxDead)).all()]
        assert session.scalar(select(func.count()).select_from(OutboxMessage)) == 0
    assert state.outbox.is_alive()
