"""The API service: `uvicorn api.main:app`.

It starts whether or not Kafka and MinIO are up: creating the bucket and the topics is a
background task (`Setup`) that retries until both exist, and `/readyz` answers 503 until then.
A request that needs a server that is down answers 503 with the reason (`server_unavailable`),
never a bare 500.
"""

import logging
import threading
from pathlib import Path
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from minio.error import S3Error, ServerError
from sqlalchemy.exc import DataError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from urllib3.exceptions import HTTPError as Urllib3Error

from api import checker
from api.auth import KeyCache
from api.db import Database
from api.event_stream import StreamSlots
from api.job_cache import JobRowCache
from api.job_events import JobEventsConsumer
from api.intake import FILE_FIELDS
from api.limits import BodySizeLimit
from api.metrics import ApiMetrics, RequestMetrics
from api.outbox import OutboxRelay
from api.routes import admin, health, jobs, models, uploads
from api.validation import InputError
from jobs.kafka import ensure_topics
from jobs.settings import Settings, get_settings
from models_store import make_store

log = logging.getLogger(__name__)

# A job message is its spec plus the job id, the input keys and a few timestamps.
JOB_MESSAGE_HEADROOM = 16 * 1024
# S3 error codes that mean "the store cannot serve now", not "this request is wrong".
STORE_UNAVAILABLE_CODES = {"NoSuchBucket", "ServiceUnavailable", "SlowDown", "InternalError",
                           "XMinioServerNotInitialized", "XMinioStorageFull", "RequestTimeout"}


class Setup(threading.Thread):
    """Creates the bucket and the topics, retrying (backoff doubling up to outbox_retry_max_s)
    until both exist. `bucket` and `topics` are set when each is done; `errors` holds the last
    error of each step that is not done yet (for /readyz). `on_topics` runs once the topics exist
    (the job-events consumer starts then, so it subscribes to topics that are there)."""

    def __init__(self, store, settings: Settings, on_topics=None):
        super().__init__(name="api-setup", daemon=True)
        self.store, self.settings, self.on_topics = store, settings, on_topics
        self.bucket, self.topics = threading.Event(), threading.Event()
        self.errors: dict[str, str] = {"bucket": "not tried yet", "topics": "not tried yet"}
        self.stopping = threading.Event()

    def run(self) -> None:
        backoff = 0.5
        while not self.stopping.is_set():
            for name, done, action in (
                ("bucket", self.bucket, self.store.ensure_bucket),
                ("topics", self.topics, lambda: ensure_topics(self.settings, timeout=10)),
            ):
                if done.is_set():
                    continue
                try:
                    action()
                except Exception as err:
                    self.errors[name] = f"{type(err).__name__}: {err}"[:500]
                    log.warning("startup: %s not ready yet (%s); retrying in %.1f s", name, self.errors[name], backoff)
                    continue
                self.errors.pop(name, None)
                done.set()
                log.info("startup: %s ready", name)
                if name == "topics" and self.on_topics is not None:
                    self.on_topics()
            if self.bucket.is_set() and self.topics.is_set():
                return
            self.stopping.wait(backoff)
            backoff = min(backoff * 2, self.settings.outbox_retry_max_s)

    def stop(self) -> None:
        self.stopping.set()


def check_settings(settings: Settings) -> None:
    """Bounds that only make sense together: a normal job's message must fit the producer."""
    if settings.max_spec_bytes + JOB_MESSAGE_HEADROOM > settings.outbox_max_message_bytes:
        raise ValueError(
            f"RETRAIN_MAX_SPEC_BYTES ({settings.max_spec_bytes}) + {JOB_MESSAGE_HEADROOM} bytes of a job message's other "
            f"fields is over RETRAIN_OUTBOX_MAX_MESSAGE_BYTES ({settings.outbox_max_message_bytes}): an accepted job could "
            "never be delivered")


def _unavailable(server: str, err: Exception) -> JSONResponse:
    log.warning("%s unavailable: %s: %s", server, type(err).__name__, err)
    what = {"store": "the object store (MinIO)", "database": "the job database"}[server]
    return JSONResponse(
        {"detail": {"field": server, "error": f"{what} is unavailable, try again later ({type(err).__name__})"}},
        status_code=503, headers={"Retry-After": "5"},
    )


def _field_of(loc) -> str:
    """('path', 'version') -> 'version'; ('body', 'spec') -> 'spec'; ('query', 'limit') -> 'limit'."""
    parts = [str(p) for p in loc]
    if len(parts) > 1 and parts[0] in ("path", "query", "body", "header", "cookie"):
        parts = parts[1:]
    return ".".join(parts) or "body"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    check_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = app.state
        state.settings = settings
        state.db = Database(settings.database_url)
        state.store = make_store(settings)
        state.events = JobEventsConsumer(state.db, settings, on_change=state.metrics.observe_job)
        state.event_streams = StreamSlots(settings.event_streams_max)
        state.keys = KeyCache(settings.auth_cache_s)
        state.job_rows = JobRowCache()
        state.job_rows.start(settings.database_url)
        state.setup = Setup(state.store, settings, on_topics=state.events.start)
        state.outbox = OutboxRelay(state.db, settings, store=state.store, ready=state.setup.topics)
        state.setup.start()
        state.outbox.start()
        threading.Thread(target=checker.warm_up, name="checker-warm-up", daemon=True).start()
        yield
        await state.job_rows.stop()
        state.setup.stop()
        state.outbox.stop()
        state.events.stop()
        state.outbox.join(timeout=15)
        if state.events.ident is not None:
            state.events.join(timeout=15)

    app = FastAPI(
        title="retrain",
        version="0.1.0",
        description="Send labelled recordings (and optionally your current model); get back a better model.",
        lifespan=lifespan,
    )
    app.state.metrics = ApiMetrics(app.state)
    app.add_middleware(RequestMetrics, metrics=app.state.metrics)

    @app.get("/metrics", include_in_schema=False)
    def metrics():  # Prometheus text format (api/metrics.py)
        return app.state.metrics.response()

    # The whole multipart body may hold every file of the form (api/intake.py), each up to max_upload_bytes.
    app.add_middleware(BodySizeLimit, max_bytes=len(FILE_FIELDS) * settings.max_upload_bytes + 1024 * 1024)

    @app.exception_handler(InputError)
    async def input_error(_request: Request, err: InputError):
        return JSONResponse({"detail": err.detail()}, status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def request_invalid(_request: Request, err: RequestValidationError):
        # One shape for every refusal: {"detail": {"field": ..., "error": ...}}.
        errors = err.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
        return JSONResponse({"detail": {"field": _field_of(first.get("loc", ())), "error": str(first.get("msg"))}}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, err: StarletteHTTPException):
        detail, code = err.detail, err.status_code
        if not isinstance(detail, dict):
            if code == 400 and str(detail).startswith("Part exceeded maximum size"):
                code = 413  # Starlette's cap on one form field (1 MiB): a size, not a syntax error
            field = {404: "path", 405: "method"}.get(code, "body")
            detail = {"field": field, "error": str(detail)}
        return JSONResponse({"detail": detail}, status_code=code, headers=getattr(err, "headers", None))

    # MinIO away: the SDK's connection errors (urllib3) and its 5xx answers.
    @app.exception_handler(Urllib3Error)
    async def store_connection(_request: Request, err: Exception):
        return _unavailable("store", err)

    @app.exception_handler(ServerError)
    async def store_server_error(_request: Request, err: Exception):
        return _unavailable("store", err)

    @app.exception_handler(S3Error)
    async def store_error(_request: Request, err: S3Error):
        if err.code in STORE_UNAVAILABLE_CODES:
            return _unavailable("store", err)
        if err.code in ("NoSuchKey", "NoSuchObject"):
            return JSONResponse({"detail": {"field": "path", "error": "the stored object is gone"}}, status_code=404)
        log.error("store refused a request: %s", err)
        return JSONResponse({"detail": {"field": "store", "error": f"the object store refused the request ({err.code})"}}, status_code=502)

    # A value the database cannot hold (PostgreSQL text takes no NUL character): the client's, a 422.
    # The routes' own patterns refuse such values first; this is the net under them.
    @app.exception_handler(DataError)
    async def database_refused_value(_request: Request, err: DataError):
        log.warning("the database refused a value: %s", err.orig)
        return JSONResponse({"detail": {"field": "body", "error": "a value the database cannot store (e.g. a NUL character)"}},
                            status_code=422)

    # The database away (a server that does not answer, SQLite locked for longer than its timeout).
    for error_class in (OperationalError, InterfaceError, DisconnectionError, PoolTimeoutError):
        app.add_exception_handler(error_class, lambda _request, err: _unavailable("database", err))

    app.include_router(health.router)

    # The dashboard (api/ui): static files that call this API.
    @app.get("/", include_in_schema=False)
    @app.get("/ui", include_in_schema=False)
    def to_dashboard():
        return RedirectResponse("/ui/")

    app.mount("/ui/", StaticFiles(directory=Path(__file__).parent / "ui", html=True), name="ui")
    app.include_router(jobs.router)
    app.include_router(uploads.router)
    app.include_router(models.router)
    app.include_router(admin.router)
    return app


logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
app = create_app()
