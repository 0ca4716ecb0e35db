"""ApiMetrics.observe_job on rows as the database gives them back (SQLite: naive UTC datetimes)
next to event times (aware)."""

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

from api.db import Job
from api.metrics import ApiMetrics


def test_dispatch_and_job_durations_are_observed_from_mixed_datetimes():
    metrics = ApiMetrics(SimpleNamespace())
    created = datetime(2026, 12, 3, 8, 0, 0)  # naive, as read back from SQLite
    job = Job(id="j", state="running", created_at=created, started_at=created.replace(tzinfo=UTC) + timedelta(seconds=2), attempts=1)
    metrics.observe_job(job)
    job.state, job.finished_at = "succeeded", created + timedelta(seconds=62)
    metrics.observe_job(job)
    value = metrics.registry.get_sample_value
    assert value("retrain_dispatch_seconds_count") == 1 and value("retrain_dispatch_seconds_sum") == 2
    assert value("retrain_job_seconds_count", {"state": "succeeded"}) == 1
    assert value("retrain_job_seconds_sum", {"state": "succeeded"}) == 60
