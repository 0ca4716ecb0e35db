"""The API's job record follows the events, in a real SQLite database."""

from api.db import Database, Job
from api.job_events import apply_event
from jobs.events import EventType, JobEvent


def make_job(db):
    with db.sessions() as session:
        session.add(Job(id="j1", task="audio_classification", model_name="m", spec={}, inputs={}, metrics={}))
        session.commit()


def apply(db, type, **data):
    with db.sessions() as session:
        apply_event(session, JobEvent(job_id="j1", type=type, data=data))
    with db.sessions() as session:
        return session.query(Job).filter_by(id="j1").one()


def test_lifecycle_and_finished_jobs_stay_finished(tmp_path):
    db = Database(f"sqlite:///{tmp_path}/t.db")
    make_job(db)
    assert apply(db, EventType.started, worker="w1").state == "running"
    job = apply(db, EventType.progress, epoch=2, epochs=10, step=40, metrics={"val_accuracy": 0.5})
    assert (job.epoch, job.epochs, job.metrics["val_accuracy"]) == (2, 10, 0.5)
    job = apply(db, EventType.succeeded, model_version=3, metrics={"accuracy": 0.9})
    assert (job.state, job.model_version, job.attempts) == ("succeeded", 3, 1)
    # A late progress event or a duplicate failure (a rerun on another worker) changes nothing.
    assert apply(db, EventType.progress, epoch=5).state == "succeeded"
    job = apply(db, EventType.failed, reason="late")
    assert (job.state, job.error, job.epoch) == ("succeeded", None, 2)


def test_events_for_unknown_jobs_are_ignored(tmp_path):
    db = Database(f"sqlite:///{tmp_path}/t.db")
    with db.sessions() as session:
        apply_event(session, JobEvent(job_id="nope", type=EventType.started))


import pytest
from pydantic import ValidationError


@pytest.mark.parametrize("type, data", [
    (EventType.progress, {"epoch": "1; DROP TABLE jobs", "epochs": 3}),
    (EventType.progress, {"epoch": 2**70}),
    (EventType.progress, {"metrics": {"val_accuracy": "high"}}),
    (EventType.progress, {"metrics": {"x" * 500: 0.5}}),
    (EventType.progress, {"metrics": [1, 2]}),
    (EventType.started, {"worker": "w" * 10_000}),
    (EventType.succeeded, {"model_version": "latest"}),
    (EventType.succeeded, {"model_version": 3, "outputs": "transcripts.csv"}),
    (EventType.failed, {"reason": {"nested": "object"}}),
])
def test_an_event_with_data_of_the_wrong_shape_changes_nothing(tmp_path, type, data):
    db = Database(f"sqlite:///{tmp_path}/t.db")
    make_job(db)
    apply(db, EventType.started, worker="w1")
    with pytest.raises(ValidationError):
        apply(db, type, **data)
    with db.sessions() as session:
        job = session.query(Job).filter_by(id="j1").one()
    assert (job.state, job.epoch, job.metrics, job.model_version, job.worker) == ("running", None, {}, None, "w1")


def test_cancelled_is_final_and_the_reason_is_kept(tmp_path):
    db = Database(f"sqlite:///{tmp_path}/t.db")
    make_job(db)
    job = apply(db, EventType.cancelled, reason="cancelled by the user")
    assert (job.state, job.error) == ("cancelled", "cancelled by the user")
    # A worker that had started it meanwhile reports late: the cancel stands.
    assert apply(db, EventType.started, worker="w2").state == "cancelled"
    assert apply(db, EventType.succeeded, model_version=1).state == "cancelled"
