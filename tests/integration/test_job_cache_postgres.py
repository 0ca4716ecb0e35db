"""The job row cache on a real PostgreSQL (api/job_cache.py, migration 0004): a change written
by anyone reaches a replica's cache as a notification, and a lost listening connection turns the
cache off until it listens again, so no change is missed."""

import asyncio
import time
import uuid

import pytest
from sqlalchemy import text, update

from api.db import Database, Job
from api.job_cache import APPLICATION_NAME, JobRowCache
from api.routes.jobs import _READ_JOB
from tests.conftest import isolated

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def db(settings, tmp_path_factory):
    assert settings.database_url.startswith("postgresql"), "the session stack runs PostgreSQL (tests/conftest.py)"
    database = Database(isolated(settings, tmp_path_factory, "jobcache").database_url)
    yield database
    database.engine.dispose()


def _add_job(db: Database) -> str:
    job_id = str(uuid.uuid4())
    with db.sessions() as session:
        session.add(Job(id=job_id, tenant="acme", task="audio_classification", model_name="kws", spec={}, inputs={}))
        session.commit()
    return job_id


def _set_state(db: Database, job_id: str, state: str) -> None:
    """A write the cache's replica knows nothing of (another replica, an operator's SQL)."""
    with db.engine.begin() as connection:
        connection.execute(update(Job).where(Job.id == job_id).values(state=state))


async def _until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.05)


async def _eventually_reads(cache, db, job_id, state, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        row = await cache.read(job_id, "acme", lambda: db.read_row(_READ_JOB, {"job_id": job_id, "tenant": "acme"}))
        if row.state == state:
            return
        assert time.monotonic() < deadline, f"the cache still shows {row.state!r}, not {state!r}, after {timeout} s"
        await asyncio.sleep(0.05)


def test_a_change_written_elsewhere_reaches_the_cache(db):
    job_id = _add_job(db)

    async def scenario():
        cache = JobRowCache(probe_s=1.0)
        cache.start(str(db.engine.url.render_as_string(hide_password=False)))
        try:
            await _until(lambda: cache.live, 15, "the cache to listen")
            await _eventually_reads(cache, db, job_id, "queued")
            assert job_id in cache.rows  # kept: the next poll costs no query
            await asyncio.to_thread(_set_state, db, job_id, "running")
            await _eventually_reads(cache, db, job_id, "running")
        finally:
            await cache.stop()

    asyncio.run(scenario())


def test_a_lost_listening_connection_turns_the_cache_off_and_a_change_meanwhile_is_seen(db):
    job_id = _add_job(db)

    def change_and_terminate_listener() -> int:
        """The row changes in the transaction that ends the listener's connection, so its
        notification goes out when nobody listens."""
        with db.engine.begin() as connection:
            connection.execute(update(Job).where(Job.id == job_id).values(state="cancelled"))
            return connection.execute(text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = :name AND datname = current_database()"),  # not another API's
                {"name": APPLICATION_NAME}).scalar()

    async def scenario():
        cache = JobRowCache(probe_s=1.0)
        cache.start(str(db.engine.url.render_as_string(hide_password=False)))
        try:
            await _until(lambda: cache.listens == 1, 15, "the cache to listen")
            await _eventually_reads(cache, db, job_id, "queued")
            assert job_id in cache.rows
            assert await asyncio.to_thread(change_and_terminate_listener) == 1
            await _until(lambda: cache.listens == 2, 15, "the cache to listen again")
            await _eventually_reads(cache, db, job_id, "cancelled", timeout=0.5)
        finally:
            await cache.stop()

    asyncio.run(scenario())
