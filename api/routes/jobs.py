"""/v1/jobs: submit, follow, cancel and download."""

import base64
import binascii
import re
import uuid
from collections.abc import Iterator
from functools import partial
from typing import Annotated

from anyio import from_thread
from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, Request, status
from fastapi.responses import RedirectResponse, StreamingResponse
from sqlalchemy import bindparam, select
from starlette.concurrency import run_in_threadpool

from api import intake
from api.auth import Caller, Reader, Role, Submitter, audit, require
from api.db import Job, OutboxMessage
from api.deps import SessionDep, SettingsDep, TenantStoreDep
from api.event_stream import job_event_stream, parse_last_event_id
from api.schemas import JobCreated, JobList, JobOut, Progress
from api.submissions import Uploads, input_key, parse_spec, submit_job
from api.job_events import settle
from jobs.events import ControlCommand, JobState
from jobs.lifecycle import Outcome

# Every route needs a key that may read (api/auth.py); the ones that change something say more.
router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(require(Role.read))])

JobId = Annotated[str, Path(pattern=r"^[A-Za-z0-9-]{1,64}$", max_length=64, description="the id POST /v1/jobs answered")]
OutputName = Annotated[str, Path(max_length=255, description="one of the job's outputs")]
# A cursor is the URL-safe base64 of a job's seq (a positive integer that fits SQLite's INTEGER).
Cursor = Annotated[str | None, Query(max_length=32, description="next_cursor of the previous page")]
_CURSOR_DIGITS = re.compile(r"[0-9]{1,18}")


def job_out(job, request: Request) -> JobOut:
    """A Job (or a row of the jobs table) as the API shows it."""
    artifact = str(request.url_for("job_artifact", job_id=job.id)) if job.model_version is not None else None
    return JobOut(
        id=job.id, state=job.state, task=job.task, model_name=job.model_name, spec=job.spec,
        base_version=job.base_version, progress=Progress(epoch=job.epoch, epochs=job.epochs, step=job.step),
        metrics=job.metrics or {}, error=job.error, model_version=job.model_version, outputs=job.outputs or [], worker=job.worker,
        attempts=job.attempts, created_at=job.created_at, updated_at=job.updated_at,
        started_at=job.started_at, finished_at=job.finished_at, artifact_url=artifact,
    )


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobCreated, openapi_extra=intake.openapi_request_body())
async def create_job(request: Request, caller: Submitter, session: SessionDep, store: TenantStoreDep, settings: SettingsDep) -> JobCreated:
    """Submit a job: a multipart form of `spec` (JSON) and the files (api/intake.py), each stored
    as it arrives; then checked (api/submissions.py). A refusal removes what was stored."""
    job_id = str(uuid.uuid4())
    form = None
    try:
        form = await intake.receive_form(
            request, store, partial(input_key, store, job_id), settings.max_spec_bytes, settings.max_upload_bytes,
            parse_spec=partial(parse_spec, settings=settings))  # a bad spec is refused before the files are read
        for field, upload_id in form.uploads.items():  # direct uploads (api/routes/uploads.py), spooled for the checks
            form.files[field] = await run_in_threadpool(
                intake.fetch_upload, store, caller.tenant, field, upload_id, settings.max_upload_bytes)
        job = await run_in_threadpool(submit_job, job_id, form.spec, Uploads(**form.files), store, session, settings, caller)
    except BaseException:
        await run_in_threadpool(store.delete_prefix, store.job_prefix(job_id))
        raise
    finally:
        for received in (form.files.values() if form else ()):
            received.file.close()
    request.app.state.outbox.wake.set()
    return JobCreated(id=job.id, state=job.state, status_url=str(request.url_for("get_job", job_id=job.id)))


@router.get("", response_model=JobList)
def list_jobs(
    request: Request,
    caller: Reader,
    session: SessionDep,
    state: JobState | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Cursor = None,
) -> JobList:
    query = select(Job).where(Job.tenant == caller.tenant).order_by(Job.seq.desc()).limit(limit + 1)
    if state is not None:
        query = query.where(Job.state == state)
    if cursor:
        query = query.where(Job.seq < decode_cursor(cursor))
    jobs = session.scalars(query).all()
    next_cursor = encode_cursor(jobs[limit - 1].seq) if len(jobs) > limit else None
    return JobList(items=[job_out(j, request) for j in jobs[:limit]], next_cursor=next_cursor)


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(str(seq).encode()).decode()


def decode_cursor(cursor: str) -> int:
    """A cursor this API gave out -> the seq it names; anything else is a 422 (strict base64 of
    at most 18 ASCII digits, so it always fits a 64-bit INTEGER column)."""
    try:
        text = base64.b64decode(cursor.encode("ascii"), altchars=b"-_", validate=True).decode("ascii")
    except (binascii.Error, UnicodeError, ValueError):
        text = ""
    if not _CURSOR_DIGITS.fullmatch(text):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail={"field": "cursor", "error": "not a cursor this API gave out"})
    return int(text)


def _get(session, job_id: str, caller: Caller) -> Job:
    """The caller's tenant's job; another tenant's answers 404 like one that does not exist."""
    job = session.scalar(select(Job).where(Job.id == job_id, Job.tenant == caller.tenant))
    if job is None:
        raise _no_job(job_id)
    return job


def _no_job(job_id: str) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, detail={"field": "job_id", "error": f"no job {job_id!r}"})


_JOB_OUT_COLUMNS = ("id", "state", "task", "model_name", "spec", "base_version", "epoch", "epochs", "step", "metrics", "error",
                    "model_version", "outputs", "worker", "attempts", "created_at", "updated_at", "started_at", "finished_at")
_READ_JOB = (select(*(Job.__table__.c[name] for name in _JOB_OUT_COLUMNS))
             .where(Job.id == bindparam("job_id"), Job.tenant == bindparam("tenant")))


async def _read_job(request: Request, job_id: str, caller: Caller):
    """`_get` for the reads clients poll: the row alone, with the attributes job_out reads, read on
    the event loop (api/db.py `read_row`: no thread-pool hop, no ORM session) or taken from the
    replica's cache of rows that have not changed since (api/job_cache.py)."""
    state = request.app.state
    row = await state.job_rows.read(job_id, caller.tenant, lambda: state.db.read_row(
        _READ_JOB, {"job_id": job_id, "tenant": caller.tenant}))
    if row is None:
        raise _no_job(job_id)
    return row


@router.get("/{job_id}", response_model=JobOut)
async def get_job(job_id: JobId, request: Request, caller: Reader) -> JobOut:
    return job_out(await _read_job(request, job_id, caller), request)


@router.get("/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}, "description": "the job's events, then new ones until the final one"}})
async def job_events(
    job_id: JobId, request: Request, caller: Reader, settings: SettingsDep,
    last_event_id: Annotated[str | None, Header(max_length=32, description="resume after this event id")] = None,
) -> StreamingResponse:
    """The job's events as Server-Sent Events (api/event_stream.py): its past events first, then
    each new one, closing after the final one."""
    db = request.app.state.db
    after = parse_last_event_id(last_event_id)
    await _read_job(request, job_id, caller)
    slots = request.app.state.event_streams
    slots.take()
    stream = job_event_stream(db, settings, slots, job_id, after, request.is_disconnected)
    return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/{job_id}/artifact")
def job_artifact(job_id: JobId, caller: Reader, session: SessionDep, store: TenantStoreDep, redirect: bool = False):
    """The trained model as SageMaker's model.tar.gz, streamed, or a presigned URL with ?redirect=true."""
    job = _get(session, job_id, caller)
    if job.state != JobState.succeeded or job.model_version is None:
        raise HTTPException(status.HTTP_409_CONFLICT, detail={"field": "job_id", "error": f"job is {job.state}, it has no model yet"})
    audit(session, caller, "model.download", f"{job.model_name}/{job.model_version}", job_id=job_id)
    return artifact_response(store, job.model_name, job.model_version, redirect)


def artifact_response(store, name: str, version: int, redirect: bool):
    key = store.artifact_key(name, version)
    if redirect:
        return RedirectResponse(store.presigned_url(key), status_code=status.HTTP_307_TEMPORARY_REDIRECT)
    size = store.size(key)
    return stream_response(store, key, "application/gzip", headers={
        "Content-Disposition": f'attachment; filename="{name}-v{version}.tar.gz"',
        "Content-Length": str(size),
    })


def stream_response(store, key: str, media_type: str, headers: dict | None = None) -> StreamingResponse:
    """A stored object, streamed. Its first chunk is read here, before the answer's status goes
    out, so a store that is down is a 503 and a missing object a 404 (the app's handlers), not a
    200 that breaks off."""
    chunks = store.stream(key)
    first = next(chunks, b"")

    def body() -> Iterator[bytes]:
        yield first
        yield from chunks

    return StreamingResponse(body(), media_type=media_type, headers=headers)


@router.get("/{job_id}/logs")
def job_logs(job_id: JobId, caller: Reader, session: SessionDep, store: TenantStoreDep):
    """The trainer's whole output (stdout and stderr), stored when the job ended."""
    _get(session, job_id, caller)
    key = f"jobs/{job_id}/train.log"
    if not store.exists(key):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail={"field": "job_id", "error": "no log yet: logs are stored when the trainer ends"})
    return stream_response(store, key, "text/plain")


@router.get("/{job_id}/outputs/{name}")
def job_output(job_id: JobId, name: OutputName, caller: Reader, session: SessionDep, store: TenantStoreDep):
    """A result file of a job that makes no model, e.g. a transcription's transcripts.csv and report.pdf."""
    job = _get(session, job_id, caller)
    if name not in (job.outputs or []):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail={"field": "name", "error": f"job has no output {name!r}; it has {job.outputs or []}"})
    media = {"csv": "text/csv", "pdf": "application/pdf", "json": "application/json"}.get(name.rsplit(".", 1)[-1], "application/octet-stream")
    return stream_response(store, f"jobs/{job_id}/outputs/{name}", media)


@router.post("/{job_id}/cancel", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut)
def cancel_job(job_id: JobId, request: Request, caller: Submitter, session: SessionDep, store: TenantStoreDep, settings: SettingsDep) -> JobOut:
    """Cancel a queued or running job. The cancel is recorded as the job's outcome at once, so it
    holds even if no worker has the job now; a worker running it stops within seconds."""
    job = _get(session, job_id, caller)
    if JobState(job.state).finished:
        raise HTTPException(status.HTTP_409_CONFLICT, detail={"field": "job_id", "error": f"job already {job.state}"})
    command = ControlCommand(command="cancel", job_id=job_id)  # the fast path to a worker running it
    session.add(OutboxMessage(topic=settings.topic_control, key=job_id, value=command.model_dump_json()))
    audit(session, caller, "job.cancel", job_id, commit=False)  # committed with the cancel
    outcome = settle(session, store, settings, job_id, Outcome.cancelled("cancelled by the user"))
    # This replica's own next read shows the cancel, without waiting for the database's notification.
    from_thread.run_sync(request.app.state.job_rows.forget, job_id)
    request.app.state.outbox.wake.set()
    if outcome.state != JobState.cancelled:
        raise HTTPException(status.HTTP_409_CONFLICT, detail={"field": "job_id", "error": f"job already {outcome.state}"})
    session.refresh(job)
    request.app.state.metrics.observe_job(job)
    return job_out(job, request)
