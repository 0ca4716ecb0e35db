"""Bad input gets a 4xx that names the field, file and row, and leaves nothing behind: no object
in the store, no message on Kafka, no job record. Runs the API in-process against the real
Kafka and MinIO, on topics and a bucket of its own so it can see exactly what was left."""

import io
import json
import pickle
import tarfile
import uuid
import zipfile

import pytest
from confluent_kafka import Consumer, TopicPartition
from sqlalchemy import func, select

from api.db import Job, OutboxMessage
from tests.conftest import in_process_api, isolated, trainable_csv

pytestmark = pytest.mark.integration

LIMIT = 4 * 1024 * 1024
SPEC = {"task": "audio_classification", "model_name": "bad-input"}


@pytest.fixture(scope="module")
def app_settings(settings, tmp_path_factory):
    return isolated(settings, tmp_path_factory, "bad-input", max_upload_bytes=LIMIT)


@pytest.fixture(scope="module")
def client(app_settings):
    with in_process_api(app_settings) as c:
        yield c


def make_zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def post(client, csv_text: bytes | str, audio: bytes | None = None, spec=SPEC, model: bytes | None = None, audio_name="audio.zip"):
    files = {"dataset": ("dataset.csv", csv_text.encode() if isinstance(csv_text, str) else csv_text, "text/csv")}
    if audio is not None:
        files["audio"] = (audio_name, audio, "application/octet-stream")
    if model is not None:
        files["model"] = ("model.bin", model, "application/octet-stream")
    return client.post("/v1/jobs", data={"spec": spec if isinstance(spec, str) else json.dumps(spec)}, files=files)


def messages_on(settings, topic: str, attempts: int = 20) -> int:
    """How many messages the topic holds (retrying while a just-created topic elects leaders)."""
    import time

    from confluent_kafka import KafkaException

    for _ in range(attempts):
        try:
            return _count_messages(settings, topic)
        except KafkaException:
            time.sleep(0.5)
    return _count_messages(settings, topic)


def _count_messages(settings, topic: str) -> int:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "probe-" + uuid.uuid4().hex})
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics[topic]
        total = 0
        for partition in metadata.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            total += high - low
        return total
    finally:
        consumer.close()


def assert_nothing_left(client, app_settings):
    state = client.app_state
    assert state.store.list_keys("jobs/") == []
    with state.db.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0
        assert session.scalar(select(func.count()).select_from(OutboxMessage)) == 0
    assert messages_on(app_settings, app_settings.topic_jobs) == 0


def good_csv(clips) -> str:
    return "audio,label\n" + "".join(f"{name},{label}\n" for name, _, label in clips)


def good_zip(clips) -> bytes:
    return make_zip({name: data for name, data, _ in clips})


def check(response, status, field, *, row=None, file=None, says=""):
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert detail["field"] == field, detail
    if row is not None:
        assert detail["row"] == row, detail
    if file is not None:
        assert detail["file"] == file, detail
    assert says.lower() in detail["error"].lower(), detail


def test_csv_without_the_required_columns(client, app_settings, clips):
    response = post(client, "path,word\na.wav,yes\n", good_zip(clips))
    check(response, 422, "dataset", row=1, file="dataset.csv", says="missing column(s) audio, label")
    assert_nothing_left(client, app_settings)


def test_empty_csv(client, app_settings, clips):
    check(post(client, "", good_zip(clips)), 422, "dataset", file="dataset.csv", says="empty")
    assert_nothing_left(client, app_settings)


def test_csv_that_is_not_utf8(client, app_settings, clips):
    name, _, label = clips[0]
    latin1 = f"audio,label\n{name},{label}\n{clips[1][0]},caf\xe9\n".encode("latin-1")
    check(post(client, latin1, good_zip(clips)), 422, "dataset", row=3, says="not UTF-8")
    assert_nothing_left(client, app_settings)


def test_a_single_class(client, app_settings, clips):
    name, _, label = clips[0]
    check(post(client, f"audio,label\n{name},{label}\n", good_zip(clips)), 422, "dataset", says="at least two classes")
    assert_nothing_left(client, app_settings)


def test_file_named_in_csv_missing_from_archive(client, app_settings, clips):
    csv_text = good_csv(clips) + "clips/not-there.wav,yes\n"
    check(post(client, csv_text, good_zip(clips)), 422, "dataset", row=4, says="'clips/not-there.wav' is not in the audio archive")
    assert_nothing_left(client, app_settings)


def test_audio_file_that_does_not_decode(client, app_settings, clips):
    entries = {name: data for name, data, _ in clips}
    entries["clips/broken.wav"] = b"RIFF\x00\x00\x00\x00WAVEthis is not audio" * 10
    csv_text = good_csv(clips) + "clips/broken.wav,no\n"
    check(post(client, csv_text, make_zip(entries)), 422, "audio", row=4, file="audio.zip", says="does not decode")
    assert_nothing_left(client, app_settings)


def test_archive_entry_with_dotdot(client, app_settings, clips):
    entries = {name: data for name, data, _ in clips}
    entries["../../etc/evil.wav"] = clips[0][1]
    check(post(client, good_csv(clips), make_zip(entries)), 422, "audio", file="audio.zip", says="stay inside")
    assert_nothing_left(client, app_settings)


def test_archive_entry_with_absolute_path(client, app_settings, clips):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data, _ in clips:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("/tmp/absolute.wav")
        info.size = len(clips[0][1])
        tar.addfile(info, io.BytesIO(clips[0][1]))
    response = post(client, good_csv(clips), buffer.getvalue(), audio_name="audio.tar.gz")
    check(response, 422, "audio", file="audio.tar.gz", says="must be relative")
    assert_nothing_left(client, app_settings)


def test_upload_over_the_size_limit(client, app_settings, clips):
    oversized = good_zip(clips) + b"\0" * (LIMIT + 1)
    check(post(client, good_csv(clips), oversized), 413, "audio", file="audio.zip", says=f"limit is {LIMIT}")
    assert_nothing_left(client, app_settings)


def test_request_body_over_the_limit_is_refused_before_it_is_read(client, app_settings):
    huge = {"Content-Length": str(10 * LIMIT), "Content-Type": "multipart/form-data; boundary=x"}
    response = client.post("/v1/jobs", content=b"--x--", headers=huge)
    assert response.status_code == 413
    assert response.json()["detail"]["field"] == "body"
    assert_nothing_left(client, app_settings)


def test_unknown_task(client, app_settings, clips):
    spec = {**SPEC, "task": "image_segmentation"}
    check(post(client, good_csv(clips), good_zip(clips), spec=spec), 422, "spec.task", says="audio_classification")
    assert_nothing_left(client, app_settings)


def test_spec_that_is_not_json(client, app_settings, clips):
    check(post(client, good_csv(clips), good_zip(clips), spec="{task: "), 422, "spec", says="json")
    assert_nothing_left(client, app_settings)


def test_base_model_that_does_not_exist(client, app_settings, clips):
    spec = {**SPEC, "base": {"model": "no-such-model", "version": 3}}
    check(post(client, good_csv(clips), good_zip(clips), spec=spec), 422, "spec.base", says="'no-such-model' has no version 3")
    assert_nothing_left(client, app_settings)


def test_base_model_upload_that_is_a_pickle(client, app_settings, clips):
    class Payload:
        def __reduce__(self):
            return (print, ("this would have run on the worker",))

    check(post(client, good_csv(clips), good_zip(clips), model=pickle.dumps(Payload())), 422, "model", says="pickle")
    assert_nothing_left(client, app_settings)


def test_classes_too_small_to_split_are_refused_at_submission(client, app_settings, clips):
    """One clip of each class and no split column: the trainer could hold out no test and no
    validation clip (jobs/splits.py), so the API says so now, naming the class and its first row."""
    first = min(clips, key=lambda clip: clip[2])  # the rule looks at the classes in sorted order
    row = 2 + clips.index(first)
    check(post(client, good_csv(clips), good_zip(clips)), 422, "dataset", row=row, file="dataset.csv",
          says=f"class {first[2]!r} has 1 clip(s) to split; at least 3 are needed to hold out a test split")
    # Asking for no test split and a bigger validation split: still one clip short.
    spec = {**SPEC, "hyperparameters": {"test_fraction": 0, "validation_fraction": 0.4}}
    check(post(client, good_csv(clips), good_zip(clips), spec=spec), 422, "dataset", row=row, says="validation split")
    assert_nothing_left(client, app_settings)


def test_a_good_submission_is_stored_and_queued(client, app_settings, clips):
    """The control for the tests above: the same checks let a good job through, and then the
    store, the database and Kafka do hold it."""
    response = post(client, trainable_csv((name, label) for name, _, label in clips), good_zip(clips))
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    keys = client.app_state.store.list_keys(f"jobs/{job_id}/")
    assert sorted(keys) == [f"jobs/{job_id}/inputs/audio.zip", f"jobs/{job_id}/inputs/dataset.csv"]
    assert client.get(f"/v1/jobs/{job_id}").json()["state"] == "queued"
    import time

    deadline = time.monotonic() + 20
    while messages_on(app_settings, app_settings.topic_jobs) == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert messages_on(app_settings, app_settings.topic_jobs) == 1
