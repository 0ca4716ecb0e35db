"""Liveness and readiness."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from jobs.kafka import check_kafka

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request):
    """Ready when Kafka, MinIO and the database all answer."""
    state = request.app.state
    checks = {}
    def database():
        with state.db.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    for name, check in (
        ("database", database),
        ("minio", state.store.ping),
        ("kafka", lambda: check_kafka(state.settings)),
    ):
        try:
            check()
            checks[name] = "ok"
        except Exception as err:
            checks[name] = f"error: {err}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)
