"""Job rows this API replica has read, kept until PostgreSQL says the row changed.

Clients poll `GET /v1/jobs/{id}`, and most polls find the job as the last one did. Reading the
row again costs a round trip through psycopg's asyncio driver and the database server's CPU
(on one machine with the API: 0.19x the requests/s of /healthz). So each replica keeps the rows
it read, and drops one when the database says it changed: a trigger (migration 0004) sends a
NOTIFY on channel `retrain_jobs`, with the job's id, after every insert, update or delete of a
jobs row, whoever wrote it. Each replica LISTENs on a connection of its own.

The cache answers only while that connection is known to be up. When it fails, or a probe
every `probe_s` goes unanswered, the cache empties and every read goes to the database until
LISTEN is back (and then it starts empty: notifications sent meanwhile were lost). A read that
was in flight when any notification arrived is not kept, since its row may predate the change.
So a replica shows a changed row for at most as long as the notification takes to arrive,
like a read that started just before the writer committed.

SQLite (one embedded process) has no NOTIFY: there the cache stays off and each read goes to
the file. Everything here runs on the API's event loop, so nothing needs a lock.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import suppress

from sqlalchemy import Row
from sqlalchemy.engine import make_url

log = logging.getLogger("retrain.api.job_cache")

CHANNEL = "retrain_jobs"  # migration 0004's trigger
RETRY_S = 1.0  # between attempts to listen again
APPLICATION_NAME = "retrain-job-cache"  # the listening connection, as pg_stat_activity shows it


class JobRowCache:
    def __init__(self, size: int = 2_000, probe_s: float = 5.0):
        self.size, self.probe_s = size, probe_s
        self.rows: dict[str, tuple[str, Row]] = {}  # job id -> (tenant, row)
        self.live = False  # True only while LISTEN is known to be in place
        self.generation = 0  # moves on at every notification and every change of `live`
        self.listens = 0  # how many times LISTEN was set up (1 + the connections lost and made again)
        self.task: asyncio.Task | None = None

    async def read(self, job_id: str, tenant: str, load: Callable[[], Awaitable[Row | None]]) -> Row | None:
        """The job's row as `tenant` may see it (None: no such job of theirs): from the cache, or
        `load()`ed from the database and kept if nothing changed meanwhile."""
        cached = self.rows.get(job_id) if self.live else None
        if cached is not None:
            return cached[1] if cached[0] == tenant else None
        generation = self.generation
        row = await load()
        if row is not None and self.live and generation == self.generation:
            if len(self.rows) >= self.size:
                self.rows.clear()
            self.rows[job_id] = (tenant, row)
        return row

    def forget(self, job_id: str) -> None:
        """The row changed: a notification, or this replica's own write (a cancel)."""
        self.generation += 1
        self.rows.pop(job_id, None)

    def set_live(self, live: bool) -> None:
        self.generation += 1
        self.rows.clear()
        self.live = live

    def start(self, database_url: str) -> None:
        """Listen for changes (PostgreSQL only; on SQLite the cache stays off)."""
        url = make_url(database_url)
        if url.get_backend_name() == "postgresql":
            from psycopg.conninfo import make_conninfo

            # libpq's own key=value form: the URL's query options (sslmode, options, ...) as they are.
            conninfo = make_conninfo(**url.translate_connect_args(username="user", database="dbname"), **url.query)
            self.task = asyncio.create_task(self._listen(conninfo), name="job-row-notifications")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with suppress(asyncio.CancelledError):
                await self.task

    async def _listen(self, conninfo: str) -> None:
        import psycopg

        down_logged = False
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                        conninfo, autocommit=True, connect_timeout=max(2, int(self.probe_s)),
                        application_name=APPLICATION_NAME) as connection:
                    await connection.execute(f"LISTEN {CHANNEL}")
                    self.set_live(True)
                    self.listens += 1
                    if down_logged:
                        log.warning("job row notifications are back: the job cache is on again")
                        down_logged = False
                    while True:
                        async for note in connection.notifies(timeout=self.probe_s):
                            self.forget(note.payload)
                        # A quiet spell: make sure the connection is still there (a half-open one
                        # would deliver nothing, and the cache would serve stale rows).
                        await asyncio.wait_for(connection.execute("SELECT 1"), self.probe_s)
            except Exception as err:  # psycopg.Error, OSError, TimeoutError: the database is away
                if not down_logged:
                    log.warning("job row notifications lost (%s: %s): every job read goes to the database until "
                                "they are back", type(err).__name__, err)
                    down_logged = True
            finally:  # lost, or cancelled by stop()
                self.set_live(False)
            await asyncio.sleep(RETRY_S)
