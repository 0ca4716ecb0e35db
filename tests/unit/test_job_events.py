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
