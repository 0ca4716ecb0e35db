"""Shared fixtures: the real local stack (Kafka, MinIO and PostgreSQL, plus API and worker
processes for the end-to-end tests) started through deploy/local, and spoken-word data sets made
with espeak-ng. The API's database in these tests is PostgreSQL, the production one; SQLite (the
embedded default) is what the unit tests and a few fault tests use."""

import io
import tarfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from demo.spoken_words import DEFAULT_WORDS, HELDOUT_VOICES, TRAIN_VOICES, make_dataset, zip_clips
from deploy.local.stack import Stack, free_port
from jobs.settings import Settings

# Few words and voices so a CPU trains in well under a minute; held-out voices stay unseen.
WORDS = DEFAULT_WORDS[:4]


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """Kafka, MinIO and PostgreSQL for the whole session, on free ports in a temporary run dir."""
    run_dir = tmp_path_factory.mktemp("stack")
    s = Stack(
        run_dir,
        api_port=free_port(), kafka_port=free_port(), kafka_controller_port=free_port(),
        minio_port=free_port(), minio_console_port=free_port(), postgres_port=free_port(), database="postgres",
        # A dead worker's job moves to another one within seconds, not the default 45 s.
        # A dead API replica's outbox claims pass to the other within seconds, not 330 s.
        extra_env={"RETRAIN_KAFKA_SESSION_TIMEOUT_MS": "6000", "RETRAIN_OUTBOX_CLAIM_S": "15"},
    )
    s.up(["kafka", "minio", "postgres"])
    yield s
    s.down()
    s.purge_postgres()


@pytest.fixture(scope="session")
def settings(stack) -> Settings:
    values = {k.removeprefix("RETRAIN_").lower(): v for k, v in stack.env().items()}
    return Settings(_env_file=None, **values)


@pytest.fixture(scope="session")
def service(stack):
    """The API and one worker as real processes, as `make up` runs them."""
    stack.up(["api", "worker"])
    yield stack
    stack.down(["worker", "api"])


@pytest.fixture(scope="session")
def api(service):
    with httpx.Client(base_url=service.api_url, headers=bearer(service.admin_key()), timeout=60) as client:
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


_ADMIN_KEYS: dict[str, str] = {}
TEST_TENANT = "tests"  # the tenant of admin_headers' keys (rows a test writes itself must carry it)


def admin_headers(app_settings: Settings) -> dict[str, str]:
    """An admin key of the app's database (created once per database), as request headers."""
    from api.auth import Role, create_key
    from api.db import Database

    url = app_settings.database_url
    if url not in _ADMIN_KEYS:
        with Database(url).sessions() as session:
            _ADMIN_KEYS[url] = create_key(session, TEST_TENANT, Role.admin, name="tests")[1]
    return bearer(_ADMIN_KEYS[url])


@pytest.fixture(scope="session")
def keyword_data(tmp_path_factory) -> dict:
    """Training CSV + zip of clips in the training voices, and held-out clips in unseen voices."""
    root = tmp_path_factory.mktemp("keywords")
    csv = make_dataset(root / "train", WORDS, TRAIN_VOICES, repeats=2, seed=1)
    heldout_csv = make_dataset(root / "heldout", WORDS, HELDOUT_VOICES, repeats=1, seed=2)
    return {
        "csv": csv,
        "zip": zip_clips(root / "train", csv, root / "train.zip"),
        "heldout_csv": heldout_csv,
        "heldout_dir": root / "heldout",
    }


def isolated(settings: Settings, tmp_path_factory, name: str, **update) -> Settings:
    """The session stack's settings with a database, bucket, topics and groups of their own, so a
    test module sees exactly what it left (and nothing another module did)."""
    suffix = f"{name}-{uuid.uuid4().hex[:8]}"
    return settings.model_copy(update={
        "database_url": fresh_database(settings, tmp_path_factory.mktemp("db"), suffix),
        "s3_bucket": suffix,
        "topic_jobs": f"{suffix}.jobs", "topic_events": f"{suffix}.events",
        "topic_control": f"{suffix}.control", "topic_dlq": f"{suffix}.dlq",
        "api_events_group": suffix, "worker_group": f"{suffix}-workers",
        **update,
    })


def fresh_database(settings: Settings, folder: Path, name: str | None = None) -> str:
    """The URL of a new, empty database on the same server as `settings`' (PostgreSQL: a
    database of its own on that server; SQLite: a file in `folder`)."""
    import sqlalchemy as sa

    name = (name or uuid.uuid4().hex[:12]).replace("-", "_").lower()
    url = sa.engine.make_url(settings.database_url)
    if url.get_backend_name() != "postgresql":
        return f"sqlite:///{folder / name}.db"
    engine = sa.create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    finally:
        engine.dispose()
    return url.set(database=name).render_as_string(hide_password=False)


@contextmanager
def in_process_api(app_settings: Settings, ready: bool = False):
    """The API app in this process (TestClient) on the real servers; `client.app_state` is the
    app's state (database, store, background threads). With `ready`, waits for /readyz."""
    from fastapi.testclient import TestClient

    from api.main import create_app

    app = create_app(app_settings)
    with TestClient(app, headers=admin_headers(app_settings)) as client:
        client.app_state = app.state
        if ready:  # the bucket and the topics are made in the background
            wait_until(lambda: client.get("/readyz").status_code == 200, 60, "the API to be ready")
        yield client


@contextmanager
def served_api(app_settings: Settings):
    """The API app served by a real uvicorn in a thread of this process, on a free port, ready
    (/readyz 200); yields its base URL. For what a TestClient cannot show (a stream read while
    it is written)."""
    import threading

    import uvicorn

    from api.main import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(app_settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: answers_ok(f"{base}/readyz"), 60, "the API to be ready")
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="session")
def clips(keyword_data) -> list[tuple[str, bytes, str]]:
    """Two real clips of different words from the generated data set, as (name, bytes, label)."""
    import csv

    rows = list(csv.DictReader(keyword_data["csv"].open()))
    first = rows[0]
    second = next(r for r in rows if r["label"] != first["label"])
    base = keyword_data["csv"].parent
    return [(r["audio"], (base / r["audio"]).read_bytes(), r["label"]) for r in (first, second)]


def trainable_csv(pairs) -> str:
    """A classification CSV of (audio, label) pairs the built-in trainers can split (jobs/splits.py):
    each pair once for training and once for validation, so one clip of each of two classes makes
    a job the API accepts (with no split column, a class needs three clips)."""
    pairs = list(pairs)
    return "audio,label,split\n" + "".join(f"{audio},{label},{split}\n" for split in ("train", "validation") for audio, label in pairs)


def submit(client: httpx.Client, spec: dict, csv: Path, audio: Path | None = None, model: Path | None = None) -> httpx.Response:
    import json

    files = {"dataset": (csv.name, csv.read_bytes(), "text/csv")}
    if audio is not None:
        files["audio"] = (audio.name, audio.read_bytes(), "application/zip")
    if model is not None:
        files["model"] = (model.name, model.read_bytes(), "application/octet-stream")
    return client.post("/v1/jobs", data={"spec": json.dumps(spec)}, files=files)


def wait_for(client: httpx.Client, job_id: str, states=("succeeded", "failed", "cancelled"), timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").raise_for_status().json()
        if job["state"] in states:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not reach {states} in {timeout} s; last: {job}")


def answers_ok(url: str) -> bool:
    """True when a GET of `url` answers 200 (nothing listening, or an error, is False)."""
    try:
        return httpx.get(url, timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until(condition, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    assert condition(), f"timed out after {timeout} s waiting for {what}"


def extract_artifact(data: bytes, dest: Path) -> Path:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(dest, filter="data")
    return dest


def onnx_heldout_accuracy(model_dir: Path, csv_path: Path) -> tuple[float, list[str]]:
    """Accuracy of a downloaded model.onnx, with onnxruntime alone, on the clips a CSV names
    (the held-out voices). Returns (accuracy, the model's labels)."""
    import csv
    import json

    import numpy as np
    import onnxruntime as ort
    import soundfile

    labels = json.loads((model_dir / "labels.json").read_text())
    session = ort.InferenceSession(str(model_dir / "model.onnx"))
    rows = list(csv.DictReader(csv_path.open()))
    correct = 0
    for row in rows:
        audio, rate = soundfile.read(csv_path.parent / row["audio"], dtype="float32")
        assert rate == 16000
        logits = session.run(["logits"], {"waveform": audio[None, :]})[0]
        correct += labels[int(np.argmax(logits[0]))] == row["label"]
    return correct / len(rows), labels
