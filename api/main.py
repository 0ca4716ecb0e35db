"""The API service: `uvicorn api.main:app`."""

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from api.db import Database
from api.job_events import JobEventsConsumer
from api.limits import BodySizeLimit
from api.outbox import OutboxRelay
from api.routes import health, jobs, models
from api.validation import InputError
from jobs.kafka import ensure_topics
from jobs.settings import Settings, get_settings
from models_store import make_store


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = app.state
        state.settings = settings
        state.db = Database(settings.database_url)
        state.store = make_store(settings)
        state.store.ensure_bucket()
        ensure_topics(settings)
        state.outbox = OutboxRelay(state.db, settings)
        state.events = JobEventsConsumer(state.db, settings)
        state.outbox.start()
        state.events.start()
        yield
        state.outbox.stop()
        state.events.stop()
        state.outbox.join(timeout=15)
        state.events.join(timeout=15)

    app = FastAPI(
        title="retrain",
        version="0.1.0",
        description="Send labelled recordings (and optionally your current model); get back a better model.",
        lifespan=lifespan,
    )
    # The whole multipart body may hold three files, each up to max_upload_bytes.
    app.add_middleware(BodySizeLimit, max_bytes=3 * settings.max_upload_bytes + 1024 * 1024)

    @app.exception_handler(InputError)
    async def input_error(_request: Request, err: InputError):
        return JSONResponse({"detail": err.detail()}, status_code=err.status)

    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(models.router)
    return app


logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
app = create_app()
