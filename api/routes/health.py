"""Liveness and readiness."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from jobs.kafka import check_kafka

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict:  # on the event loop: no thread-pool hop that busy uploads could queue behind
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request):
    """Ready when Kafka, MinIO and the database answer, the bucket and the topics exist, and the
    background threads (outbox relay, job-events consumer) are alive. 503 otherwise, with each
    check's error."""
    state = request.app.state
    checks = {}

    def database():
        with state.db.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    def setup(name: str):
        def check():
            if not getattr(state.setup, name).is_set():
                raise RuntimeError(f"not created yet: {state.setup.errors.get(name, 'in progress')}")
        return check

    def alive(thread, waiting_for_topics: bool = False):
        def check():
            if thread.is_alive():
                return
            if waiting_for_topics and thread.ident is None and not state.setup.topics.is_set():
                raise RuntimeError("waiting for the topics to exist")
            raise RuntimeError(f"thread {thread.name} is not running")
        return check

    for name, check in (
        ("database", database),
        ("minio", state.store.ping),
        ("kafka", lambda: check_kafka(state.settings)),
        ("bucket", setup("bucket")),
        ("topics", setup("topics")),
        ("outbox_relay", alive(state.outbox)),
        ("job_events", alive(state.events, waiting_for_topics=True)),
    ):
        try:
            check()
            checks[name] = "ok"
        except Exception as err:
            checks[name] = f"error: {err}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)
