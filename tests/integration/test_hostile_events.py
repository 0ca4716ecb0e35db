"""A hostile trainer against the real service: a worker process (process runner), the API, Kafka
and MinIO, where the trainer is outside code that forges progress, floods its output, and leaves
links to host files where the worker reads its results.

Each case is one job whose trainer does one hostile thing (hyperparameter `test_action`); each
asserts that the job's record stays sane (right state, integer progress, finite metrics, no
host file content, `GET /v1/jobs` still answers) and that the worker is still up. A normal job
with the real audio trainer succeeds afterwards, its progress arriving through the token channel.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
import time
import uuid
from pathlib import Path

import httpx
import pytest
from confluent_kafka import Consumer

from deploy.local.stack import REPO_ROOT, Stack, free_port
from tests.conftest import bearer, submit, wait_for

pytestmark = pytest.mark.integration

SECRET = f"HOST-SECRET-{uuid.uuid4().hex}"
LOG_FILE_MAX = 1024**2
LOG_EVENTS_MAX = 100  # under the burst (200), so the cap is what binds

TRAINER = r'''
import json, os, sys, time
from pathlib import Path

token = os.environ.get("RETRAIN_PROGRESS_TOKEN", "")
action = os.environ.get("SM_HP_TEST_ACTION", "succeed")
model = Path(os.environ["SM_MODEL_DIR"])
output = Path(os.environ["SM_OUTPUT_DIR"])
data = Path(os.environ["SM_OUTPUT_DATA_DIR"])
secret_file = SECRET_FILE
other_job = os.environ.get("SM_HP_OTHER_JOB", "someone-else")


def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def progress(text):
    say(f"retrain-progress {token} {text}")


def finish(metrics=None):
    (model / "model.bin").write_bytes(b"weights")
    (data / "metrics.json").write_text(json.dumps(metrics or {"accuracy": 0.5}))
    progress(json.dumps({"epoch": 1, "epochs": 1, "step": 10, "metrics": {"val_accuracy": 0.5}}))
    sys.exit(0)


if action == "forged_progress":
    say(json.dumps({"epoch": 999, "epochs": 999, "step": 999, "metrics": {"val_accuracy": 99.0}}))
    say("retrain-progress " + "0" * 32 + " " + json.dumps({"epoch": 998, "metrics": {"val_accuracy": 98.0}}))
    say("retrain-progress " + json.dumps({"epoch": 997}))
elif action == "event_keys":
    progress(json.dumps({"epoch": 996, "type": "succeeded", "job_id": other_job}))
    progress(json.dumps({"epoch": 995, "wait": True, "data": {"model_version": 7}}))
    say(json.dumps({"type": "failed", "job_id": other_job, "reason": "forged"}))
elif action == "wrong_types":
    for record in ({"epoch": "3"}, {"epoch": 2.5}, {"epoch": True}, {"step": 2**40}, {"epoch": -4},
                   {"epochs": [1]}, {"metrics": {"val_accuracy": "0.9"}}, {"metrics": [1, 2]}, {"phase": "a\u0000b"}):
        progress(json.dumps(record))
elif action == "nan":
    progress('{"epoch": 1, "metrics": {"val_accuracy": NaN}}')
    progress('{"epoch": 1, "metrics": {"val_accuracy": Infinity, "val_loss": -Infinity}}')
    progress('{"epoch": 1, "metrics": {"val_accuracy": 1e999}}')
elif action == "many_metrics":
    progress(json.dumps({"epoch": 1, "metrics": {f"m{i}": 1.0 for i in range(10_000)}}))
    progress(json.dumps({"epoch": 1, "metrics": {"bad name\nwith newline": 1.0, "x" * 500: 2.0}}))
elif action == "huge_line":
    sys.stdout.write("h" * (5 * 1024 * 1024))  # 5 MB without a newline
    say("")
    progress(json.dumps({"epoch": 1, "metrics": {"pad": 1.0}, "phase": "p"}) + " " * 100_000)
    say("[" * 200_000)
elif action == "garbage":
    sys.stdout.buffer.write(b"\x00\xff\xfe\x1b[2J\x1b]0;title\x07 \xc3\x28 \r\r\n" * 100)
    sys.stdout.flush()
elif action == "flood":
    line = "f" * 1000 + "\n"
    for _ in range(20_000):  # 20 MB
        sys.stdout.write(line)
    sys.stdout.flush()
    say("the flood is over")
elif action == "progress_flood":
    for step in range(20_000):
        progress(json.dumps({"epoch": 1, "epochs": 1, "step": step, "metrics": {"loss": 1.0}}))
    progress(json.dumps({"epoch": 1, "epochs": 1, "step": 20_000, "metrics": {"loss": 0.5}}))
elif action == "failure_link":
    (output / "failure").symlink_to(secret_file)
    sys.exit(3)
elif action == "failure_fifo":
    os.mkfifo(output / "failure")
    sys.exit(3)
elif action == "failure_in_linked_dir":
    os.rename(data, output / "data.moved")
    data.symlink_to(Path(secret_file).parent, target_is_directory=True)
    finish()
elif action == "metrics_link":
    (model / "model.bin").write_bytes(b"weights")
    (data / "metrics.json").symlink_to(secret_file)
    sys.exit(0)
elif action == "model_links":
    (model / "sub").mkdir()
    (model / "sub" / "weights.bin").write_bytes(b"w" * 100)
    (model / "labels.json").symlink_to(secret_file)
    (model / "hostdir").symlink_to(Path(secret_file).parent, target_is_directory=True)
    os.mkfifo(model / "pipe")
    (model / "model.bin").write_bytes(b"weights")
    (data / "metrics.json").write_text(json.dumps({"accuracy": 0.75}))
    (data / "plot.png").symlink_to(secret_file)
    sys.exit(0)
elif action == "too_many_files":
    for i in range(300):
        (model / f"f{i}").write_bytes(b"x")
    finish()
elif action == "succeed":
    pass
else:
    print("unknown action", action, file=sys.stderr)
    sys.exit(9)
finish()
'''


@pytest.fixture(scope="module")
def hostile(stack, tmp_path_factory):
    """API + one worker of their own (own topics, bucket, database) on the session's Kafka and
    MinIO, with the hostile trainer as the built-in `audio` trainer; bounds made small."""
    root = tmp_path_factory.mktemp("hostile")
    secret_file = root / "host" / "passwd"
    secret_file.parent.mkdir()
    secret_file.write_text(json.dumps({SECRET: 1.0, "accuracy": 0.99}) + "\n" + SECRET + "\n")
    trainers = root / "trainers"
    (trainers / "audio").mkdir(parents=True)
    (trainers / "audio" / "train").write_text(TRAINER.replace("SECRET_FILE", repr(str(secret_file))))
    suffix = uuid.uuid4().hex[:8]
    s = Stack(
        root / "run", api_port=free_port(), kafka_port=stack.kafka_port,
        kafka_controller_port=stack.kafka_controller_port, minio_port=stack.minio_port,
        minio_console_port=stack.minio_console_port,
        extra_env={
            "RETRAIN_TRAINER_DIR": str(trainers),
            "RETRAIN_S3_BUCKET": f"hostile-{suffix}",
            "RETRAIN_TOPIC_JOBS": f"hostile-{suffix}.jobs",
            "RETRAIN_TOPIC_EVENTS": f"hostile-{suffix}.events",
            "RETRAIN_TOPIC_CONTROL": f"hostile-{suffix}.control",
            "RETRAIN_TOPIC_DLQ": f"hostile-{suffix}.dlq",
            "RETRAIN_WORKER_GROUP": f"hostile-{suffix}-workers",
            "RETRAIN_API_EVENTS_GROUP": f"hostile-{suffix}-api",
            "RETRAIN_TRAINER_LOG_FILE_MAX_BYTES": str(LOG_FILE_MAX),
            "RETRAIN_TRAINER_LOG_EVENTS_MAX": str(LOG_EVENTS_MAX),
            "RETRAIN_OUTPUT_MAX_FILES": "200",
            "RETRAIN_JOB_MAX_MEMORY_MB": "3072",
        },
    )
    s.up(["api", "worker"])
    with httpx.Client(base_url=s.api_url, headers=bearer(s.admin_key()), timeout=60) as client:
        yield {"stack": s, "api": client, "secret_file": secret_file, "topic_events": f"hostile-{suffix}.events"}
    s.down(["worker", "api"])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    """A small valid upload (two labels of spoken words) for the hostile jobs."""
    from demo.spoken_words import DEFAULT_WORDS, TRAIN_VOICES, make_dataset, zip_clips

    root = tmp_path_factory.mktemp("hostile-data")
    csv = make_dataset(root / "train", DEFAULT_WORDS[:2], TRAIN_VOICES[:3], repeats=1, seed=1)
    return csv, zip_clips(root / "train", csv, root / "train.zip")


def run_job(hostile, dataset, action: str, **spec_extra) -> dict:
    spec = {"task": "audio_classification", "model_name": f"hostile-{action.replace('_', '-')}",
            "hyperparameters": {"test_action": action, **spec_extra.pop("hyperparameters", {})}, **spec_extra}
    response = submit(hostile["api"], spec, *dataset)
    assert response.status_code == 202, response.text
    return wait_for(hostile["api"], response.json()["id"], timeout=300)


def assert_sane(hostile, job: dict) -> None:
    """The record reads back, its numbers fit their columns, and the worker is still up."""
    assert hostile["stack"].is_running("worker"), "the worker died"
    listing = hostile["api"].get("/v1/jobs")
    assert listing.status_code == 200, listing.text
    again = hostile["api"].get(f"/v1/jobs/{job['id']}")
    assert again.status_code == 200
    job = again.json()
    for key in ("epoch", "epochs", "step"):
        value = job["progress"][key]
        assert value is None or (type(value) is int and 0 <= value < 2**31), job["progress"]
    for name, value in (job["metrics"] or {}).items():
        assert value is None or (isinstance(value, (int, float)) and math.isfinite(value)), (name, value)
    assert SECRET not in json.dumps(job)


def events_of(hostile, job_id: str, until_type: str = "succeeded", timeout: float = 60) -> list[dict]:
    """The job's events on Kafka, read from the start of the topic up to its outcome."""
    return read_events(hostile["stack"], hostile["topic_events"], job_id, until_type, timeout)


def read_events(stack: Stack, topic: str, job_id: str, until_type: str = "succeeded", timeout: float = 60) -> list[dict]:
    consumer = Consumer({"bootstrap.servers": stack.kafka_bootstrap, "group.id": f"t-{uuid.uuid4().hex}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    found: list[dict] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None or message.error():
                continue
            event = json.loads(message.value())
            if event["job_id"] == job_id:
                found.append(event)
                if event["type"] == until_type:
                    return found
    finally:
        consumer.close()
    raise AssertionError(f"no {until_type} event for {job_id} within {timeout} s ({len(found)} events)")


def test_forged_progress_without_the_token_is_only_logged(hostile, dataset):
    job = run_job(hostile, dataset, "forged_progress")
    assert job["state"] == "succeeded", job["error"]
    assert job["progress"]["epoch"] == 1 and job["progress"]["epochs"] == 1  # only the real record
    assert job["metrics"].get("val_accuracy") != 99.0 and job["metrics"].get("val_accuracy") != 98.0
    assert_sane(hostile, job)
    logs = [e["data"]["line"] for e in events_of(hostile, job["id"]) if e["type"] == "log"]
    assert any('"epoch": 999' in line for line in logs)  # relayed as the log line it is
    assert any("without this run's token" in line for line in logs)


def test_a_record_cannot_speak_for_another_job_or_set_event_keys(hostile, dataset):
    victim = run_job(hostile, dataset, "succeed")
    job = run_job(hostile, dataset, "event_keys", hyperparameters={"other_job": victim["id"]})
    assert job["state"] == "succeeded", job["error"]
    assert job["progress"]["epoch"] == 1
    assert_sane(hostile, job)
    victim_now = hostile["api"].get(f"/v1/jobs/{victim['id']}").json()
    assert victim_now["state"] == "succeeded" and victim_now["progress"] == victim["progress"]
    events = events_of(hostile, job["id"])
    assert all(e["job_id"] == job["id"] for e in events)
    assert [e["data"].get("epoch") for e in events if e["type"] == "progress"] == [1]


FINISH = {"epoch": 1, "epochs": 1, "step": 10, "metrics": {"val_accuracy": 0.5}}  # the trainer's valid record


def only_the_valid_record_went_out(hostile, job: dict) -> None:
    events = events_of(hostile, job["id"])
    assert [e["data"] for e in events if e["type"] == "progress"] == [FINISH]
    refused = [e for e in events if e["type"] == "log" and "kept as a log line" in e["data"]["line"]]
    assert refused, "each refused record is noted in the job's log"


def test_progress_fields_of_the_wrong_type_never_reach_the_record(hostile, dataset):
    job = run_job(hostile, dataset, "wrong_types")
    assert job["state"] == "succeeded", job["error"]
    assert job["progress"] == {"epoch": 1, "epochs": 1, "step": 10}
    assert_sane(hostile, job)
    only_the_valid_record_went_out(hostile, job)


def test_nan_and_infinite_metrics_are_refused(hostile, dataset):
    job = run_job(hostile, dataset, "nan")
    assert job["state"] == "succeeded", job["error"]
    assert_sane(hostile, job)
    only_the_valid_record_went_out(hostile, job)


def test_ten_thousand_metrics_are_refused(hostile, dataset):
    job = run_job(hostile, dataset, "many_metrics")
    assert job["state"] == "succeeded", job["error"]
    assert len(job["metrics"]) < 10
    assert_sane(hostile, job)
    only_the_valid_record_went_out(hostile, job)


def test_huge_and_deep_lines_are_cut_and_the_worker_goes_on(hostile, dataset):
    job = run_job(hostile, dataset, "huge_line")
    assert job["state"] == "succeeded", job["error"]
    assert job["progress"]["epoch"] == 1
    assert_sane(hostile, job)
    logs = [e["data"]["line"] for e in events_of(hostile, job["id"]) if e["type"] == "log"]
    assert logs and max(len(line) for line in logs) <= 2100
    assert any("over 16384 bytes" in line for line in logs)


def test_binary_garbage_is_a_log_line(hostile, dataset):
    job = run_job(hostile, dataset, "garbage")
    assert job["state"] == "succeeded", job["error"]
    assert_sane(hostile, job)


def test_a_flood_of_output_is_bounded_in_kafka_and_in_train_log(hostile, dataset):
    job = run_job(hostile, dataset, "flood")
    assert job["state"] == "succeeded", job["error"]
    assert_sane(hostile, job)
    logs = [e for e in events_of(hostile, job["id"]) if e["type"] == "log"]
    assert LOG_EVENTS_MAX <= len(logs) <= LOG_EVENTS_MAX + 25  # the cap plus the worker's notes
    assert "log lines were not sent as events" in logs[-1]["data"]["line"]
    from jobs.settings import Settings
    from models_store import make_store

    values = {k.removeprefix("RETRAIN_").lower(): v for k, v in hostile["stack"].env().items()}
    store = make_store(Settings(_env_file=None, **values))
    train_log = b"".join(store.stream(f"jobs/{job['id']}/train.log"))
    assert len(train_log) <= LOG_FILE_MAX
    assert b"the flood is over" in train_log and b"left out: train.log is bounded" in train_log


def test_a_progress_flood_is_thinned_to_the_latest(hostile, dataset):
    job = run_job(hostile, dataset, "progress_flood")
    assert job["state"] == "succeeded", job["error"]
    assert_sane(hostile, job)
    progress = [e for e in events_of(hostile, job["id"]) if e["type"] == "progress"]
    assert 1 <= len(progress) < 2000  # 20,002 records, at most 5/s after a burst of 10


def test_a_failure_file_linked_to_a_host_file_does_not_leak_it(hostile, dataset):
    job = run_job(hostile, dataset, "failure_link")
    assert job["state"] == "failed"
    assert job["error"] == "trainer exited with code 3"
    assert_sane(hostile, job)


def test_a_failure_fifo_does_not_block_the_worker(hostile, dataset):
    job = run_job(hostile, dataset, "failure_fifo")
    assert job["state"] == "failed" and job["error"] == "trainer exited with code 3"
    assert_sane(hostile, job)


def test_an_output_dir_linked_to_the_host_is_not_read(hostile, dataset):
    job = run_job(hostile, dataset, "failure_in_linked_dir")
    assert_sane(hostile, job)
    assert job["state"] == "succeeded", job["error"]
    assert SECRET not in json.dumps(job["metrics"])


def test_a_metrics_file_linked_to_a_host_file_is_not_read(hostile, dataset):
    job = run_job(hostile, dataset, "metrics_link")
    assert_sane(hostile, job)
    assert job["state"] == "succeeded", job["error"]
    assert job["metrics"].get("accuracy") != 0.99


def test_the_stored_model_holds_no_links_and_no_host_file(hostile, dataset):
    job = run_job(hostile, dataset, "model_links")
    assert job["state"] == "succeeded", job["error"]
    assert_sane(hostile, job)
    artifact = hostile["api"].get(f"/v1/jobs/{job['id']}/artifact")
    assert artifact.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(artifact.content), mode="r:gz") as tar:
        members = tar.getmembers()
        names = sorted(m.name.removeprefix("./") for m in members if m.name not in (".", "./"))
        assert all(m.isfile() or m.isdir() for m in members), [(m.name, m.type) for m in members]
        content = b"".join(tar.extractfile(m).read() for m in members if m.isfile())
    assert SECRET.encode() not in content
    assert "model.bin" in names and "sub/weights.bin" in names
    assert not any(n.endswith(("labels.json", "pipe")) or n.startswith("hostdir") for n in names), names


def test_too_many_output_files_fail_the_job_with_a_reason(hostile, dataset):
    job = run_job(hostile, dataset, "too_many_files")
    assert job["state"] == "failed" and "more than 200 files" in job["error"]
    assert_sane(hostile, job)


def test_resources_over_the_workers_cap_are_refused(hostile, dataset):
    job = run_job(hostile, dataset, "succeed", resources={"memory_mb": 8192})
    assert job["state"] == "failed"
    assert "memory 8192 MiB" in job["error"] and "at most 3072 MiB" in job["error"]
    assert_sane(hostile, job)


def test_a_normal_job_succeeds_afterwards_with_its_progress(hostile, dataset):
    job = run_job(hostile, dataset, "succeed")
    assert job["state"] == "succeeded", job["error"]
    assert job["progress"] == {"epoch": 1, "epochs": 1, "step": 10}
    assert job["metrics"]["accuracy"] == 0.5
    assert_sane(hostile, job)


def test_the_real_audio_trainer_reports_progress_through_the_token_channel(stack, tmp_path_factory, keyword_data):
    """The real CNN trainer behind a real worker: its progress lines carry the run's token, and
    they reach the job record (a trainer whose lines were all refused would show no epoch)."""
    root = tmp_path_factory.mktemp("real")
    suffix = uuid.uuid4().hex[:8]
    s = Stack(
        root / "run", api_port=free_port(), kafka_port=stack.kafka_port,
        kafka_controller_port=stack.kafka_controller_port, minio_port=stack.minio_port,
        minio_console_port=stack.minio_console_port,
        extra_env={
            "RETRAIN_TRAINER_DIR": str(REPO_ROOT / "trainer_images"),
            "RETRAIN_S3_BUCKET": f"real-{suffix}",
            "RETRAIN_TOPIC_JOBS": f"real-{suffix}.jobs",
            "RETRAIN_TOPIC_EVENTS": f"real-{suffix}.events",
            "RETRAIN_TOPIC_CONTROL": f"real-{suffix}.control",
            "RETRAIN_TOPIC_DLQ": f"real-{suffix}.dlq",
            "RETRAIN_WORKER_GROUP": f"real-{suffix}-workers",
            "RETRAIN_API_EVENTS_GROUP": f"real-{suffix}-api",
        },
    )
    s.up(["api", "worker"])
    try:
        with httpx.Client(base_url=s.api_url, headers=bearer(s.admin_key()), timeout=60) as client:
            spec = {"task": "audio_classification", "model_name": "real-progress",
                    "hyperparameters": {"epochs": 2, "patience": 2, "batch_size": 8}}
            response = submit(client, spec, keyword_data["csv"], keyword_data["zip"])
            assert response.status_code == 202, response.text
            job = wait_for(client, response.json()["id"], timeout=600)
            assert job["state"] == "succeeded", job["error"]
            assert job["progress"]["epoch"] == 2 and job["progress"]["epochs"] == 2
            progress = [e["data"] for e in read_events(s, f"real-{suffix}.events", job["id"]) if e["type"] == "progress"]
            assert [p["epoch"] for p in progress] == [1, 2]
            assert {"train_loss", "val_loss"} <= set(progress[0]["metrics"]), progress[0]
    finally:
        s.down(["worker", "api"])
