"""The API's Prometheus metrics, served at GET /metrics (text exposition format).

    retrain_jobs{state}                      jobs in the database by state (queued = the queue's depth)
    retrain_outbox_rows / _dead_rows         messages waiting for Kafka / set aside for good
    retrain_dispatch_seconds                 a job's 202 -> started (its first worker's event)
    retrain_job_seconds{state}               started -> final state
    retrain_http_requests_total{method,route,status} and retrain_http_request_seconds{method,route}
    retrain_event_streams_open               GET /v1/jobs/{id}/events streams open now

The counts are read from the database at scrape time (one grouped query), so every replica of
the API reports the same totals; the histograms are of the events this replica applied. Routes
are labelled by their template (/v1/jobs/{job_id}), never by the path a client sent.
Workers have metrics of their own (worker/metrics.py): consumer lag, running jobs, GPUs.
"""

import time
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import func, select
from starlette.responses import Response

from api.db import Database, Job, OutboxDead, OutboxMessage
from jobs.events import JobState

DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400)
DISPATCH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)


class ApiMetrics:
    def __init__(self, state):
        """`state`: the app's state, whose database and event streams exist once it started."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.dispatch = Histogram("retrain_dispatch_seconds", "A job's acceptance (202) to its start on a worker",
                                  buckets=DISPATCH_BUCKETS, registry=self.registry)
        self.job_duration = Histogram("retrain_job_seconds", "A job's start to its final state", ["state"],
                                      buckets=DURATION_BUCKETS, registry=self.registry)
        self.requests = Counter("retrain_http_requests", "HTTP requests answered", ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("retrain_http_request_seconds", "HTTP request handling time (to the response's start)",
                                 ["method", "route"], registry=self.registry)
        self.registry.register(_DatabaseCollector(state))

    def observe_job(self, job: Job) -> None:
        """Called when an event changed a job's row (api/job_events.py)."""
        state = JobState(job.state)
        if state == JobState.running and job.started_at and job.created_at and job.attempts <= 1:
            self.dispatch.observe(_seconds(job.created_at, job.started_at))
        elif state.finished and job.started_at and job.finished_at:
            self.job_duration.labels(state.value).observe(_seconds(job.started_at, job.finished_at))

    def response(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)



def _seconds(start: datetime, end: datetime) -> float:
    """end - start; SQLite gives back naive datetimes (UTC), events aware ones."""
    start, end = (t if t.tzinfo else t.replace(tzinfo=UTC) for t in (start, end))
    return max(0.0, (end - start).total_seconds())


class RequestMetrics:
    """Pure ASGI middleware: counts and times each HTTP request by method, route template and
    status (the time to the response's start, so a stream counts until its headers)."""

    def __init__(self, app, metrics: ApiMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = {"code": 500}

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                route = getattr(scope.get("route"), "path", None) or "unmatched"  # never the raw path
                self.metrics.latency.labels(scope["method"], route).observe(time.perf_counter() - started)
                self.metrics.requests.labels(scope["method"], route, str(status["code"])).inc()
            await send(message)

        await self.app(scope, receive, send_and_note)


class _DatabaseCollector:
    def __init__(self, state):
        self.state = state

    def describe(self):
        return []  # collected at scrape time only (a registry would otherwise call collect() to describe)

    def collect(self):
        jobs = GaugeMetricFamily("retrain_jobs", "Jobs by state (queued: the queue's depth)", labels=["state"])
        outbox = GaugeMetricFamily("retrain_outbox_rows", "Outbox messages not yet acknowledged by Kafka")
        dead = GaugeMetricFamily("retrain_outbox_dead_rows", "Outbox messages Kafka refused for good (set aside)")
        db: Database | None = getattr(self.state, "db", None)
        if db is None:
            return
        try:
            with db.sessions() as session:
                counts = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
                outbox.add_metric([], session.scalar(select(func.count()).select_from(OutboxMessage)))
                dead.add_metric([], session.scalar(select(func.count()).select_from(OutboxDead)))
        except Exception:  # the database away: the scrape still answers, without these
            return
        for state in JobState:
            jobs.add_metric([state.value], counts.get(state.value, 0))
        yield jobs
        yield outbox
        yield dead
        slots = getattr(self.state, "event_streams", None)
        if slots is not None:
            streams = GaugeMetricFamily("retrain_event_streams_open", "GET /v1/jobs/{id}/events streams open")
            streams.add_metric([], slots.open)
            yield streams
