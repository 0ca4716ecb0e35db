"""The store's records that keep one run per job and one outcome per job, on the real MinIO:
conditional writes (first writer wins), the job lease, `latest` that never moves backwards."""

import uuid

import pytest

from jobs.lifecycle import Outcome
from models_store import make_store
from worker import lease as lease_module
from worker.lease import JobLease, LeaseLost

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def store(settings):
    s = make_store(settings.model_copy(update={"s3_bucket": f"lifecycle-{uuid.uuid4().hex[:8]}"}))
    s.ensure_bucket()
    return s


def test_the_first_outcome_wins(store):
    job = str(uuid.uuid4())
    cancelled = store.record_job_outcome(job, Outcome.cancelled("cancelled by the user"))
    # A worker that finished the same job a moment later does not overwrite the cancel.
    late = store.record_job_outcome(job, Outcome.succeeded(model_name="m", model_version=1))
    assert cancelled == late == store.job_outcome(job)
    assert store.job_outcome(job).state == "cancelled"


def test_one_live_lease_per_job(store):
    job = str(uuid.uuid4())
    first = JobLease(store, job, "worker-a", ttl_s=30)
    assert first.try_take().attempt == 1
    second = JobLease(store, job, "worker-b", ttl_s=30)
    assert second.try_take() is None  # worker-a lives: worker-b waits
    first.renew()
    assert second.try_take() is None


def test_an_expired_lease_is_taken_over_and_counted_as_a_crash(store):
    job = str(uuid.uuid4())
    dead = JobLease(store, job, "worker-a", ttl_s=-1)  # a holder that stopped renewing: expired
    dead.try_take()
    taker = JobLease(store, job, "worker-b", ttl_s=30)
    taken = taker.try_take()
    assert (taken.attempt, taken.crashes) == (2, 1)
    with pytest.raises(LeaseLost):
        dead.renew()  # the old holder, back from a pause, learns it lost the job


def test_a_released_lease_is_no_crash_and_a_previous_life_is_taken_over_at_once(store, monkeypatch):
    job = str(uuid.uuid4())
    graceful = JobLease(store, job, "worker-a", ttl_s=30)
    graceful.try_take()
    graceful.release()
    taken = JobLease(store, job, "worker-b", ttl_s=30).try_take()
    assert (taken.attempt, taken.crashes) == (2, 0)
    # worker-b dies; the same worker id restarted (another process) takes it over at once.
    monkeypatch.setattr(lease_module, "INSTANCE", "next-life")
    taken = JobLease(store, job, "worker-b", ttl_s=30).try_take()
    assert (taken.attempt, taken.crashes) == (3, 1)


def test_latest_never_moves_backwards(store, tmp_path):
    name = f"m-{uuid.uuid4().hex[:6]}"
    model, data = tmp_path / "model", tmp_path / "data"
    model.mkdir()
    data.mkdir()
    (model / "weights.bin").write_bytes(b"w")
    lineage = {"task": "audio_classification", "dataset": "d"}
    first = store.publish_version(name, "job-1", model, data, lineage)
    second = store.publish_version(name, "job-2", model, data, lineage)
    assert store.aliases(name)["latest"] == second.version
    store._advance_latest(name, first.version)  # job-1's worker, slow, moves latest late
    assert store.aliases(name)["latest"] == second.version
    assert store.find_version(name, "latest").version == second.version
    assert store.find_version(name, "²") is None  # str.isdigit() says yes to it; not a version
