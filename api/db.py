"""Job records and the transactional outbox, through SQLAlchemy (SQLite by default)."""

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, DateTime, Integer, String, Text, create_engine, event
from sqlalchemy.engine import Engine, Row
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.sql import Executable
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from jobs.events import JobState, utcnow


READ_ON_LOOP_TIMEOUT_S = 0.5  # SQLite: how long a read on the event loop waits for a locked file


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"

    # seq orders the listing and backs its cursor; id is what clients see.
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(36), unique=True, index=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True, default="local", server_default="local")  # the submitting key's
    state: Mapped[str] = mapped_column(String(16), index=True, default=JobState.queued)
    task: Mapped[str] = mapped_column(String(32))
    model_name: Mapped[str] = mapped_column(String(64))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    inputs: Mapped[dict[str, Any]] = mapped_column(JSON)
    base_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    worker: Mapped[str | None] = mapped_column(String(128), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    epoch: Mapped[int | None] = mapped_column(Integer, nullable=True)
    epochs: Mapped[int | None] = mapped_column(Integer, nullable=True)
    step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    model_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    outputs: Mapped[list[str]] = mapped_column(JSON, default=list)  # result files of jobs that make no model


class JobEventRecord(Base):
    """An event that changed a job, as the API applied it (validated data only), in the order it
    was applied: what GET /v1/jobs/{id}/events replays. `seq` is the Server-Sent Events id a
    client resumes from (Last-Event-ID). A table of its own, so an older database gains it from
    create_all."""

    __tablename__ = "job_events"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(36), index=True)
    type: Mapped[str] = mapped_column(String(16))
    time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class OutboxMessage(Base):
    """A Kafka message written in the same transaction as the job it belongs to; the relay
    publishes it and deletes it only once the broker acknowledged it. With several API replicas
    on one database, the relay of one replica claims a row (`claimed_by`, until `claimed_until`)
    before producing it, so the others leave it alone while that replica lives."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    topic: Mapped[str] = mapped_column(String(255))
    key: Mapped[str] = mapped_column(String(255))
    value: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    claimed_by: Mapped[str | None] = mapped_column(String(32), nullable=True)
    claimed_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class OutboxDead(Base):
    """An outbox row the broker refused for good (too large, an invalid topic, ...), set aside
    by the relay so the rows behind it flow; its job, if it was a job message, is failed with
    the reason. Kept for the operator: nothing sends these again by itself. A table of its own,
    so a database made before it existed gains it from create_all."""

    __tablename__ = "outbox_dead"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    outbox_id: Mapped[int] = mapped_column(Integer)  # the row's id in the outbox (SQLite may reuse it later)
    topic: Mapped[str] = mapped_column(String(255))
    key: Mapped[str] = mapped_column(String(255))
    value: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    failed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    error: Mapped[str] = mapped_column(Text)


class ApiKey(Base):
    """An API key (api/auth.py): its secret is stored only as a SHA-256 hash (keys are 256 random
    bits, so a fast hash is safe); the key itself is shown once, when it is created."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # the public part of the key
    secret_hash: Mapped[str] = mapped_column(String(64))
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    role: Mapped[str] = mapped_column(String(16))
    name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(32), nullable=True)  # the admin key that made it
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class AuditEntry(Base):
    """Who did what: submissions, cancels, alias moves, downloads, key changes (GET /v1/admin/audit)."""

    __tablename__ = "audit"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    time: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    key_id: Mapped[str] = mapped_column(String(32))
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    action: Mapped[str] = mapped_column(String(32))  # job.submit, job.cancel, alias.set, model.download, key.create, ...
    resource: Mapped[str] = mapped_column(String(255))  # a job id, model/version, key id
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Database:
    def __init__(self, url: str):
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(url, connect_args={"timeout": 30} if url.startswith("sqlite") else {})
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        migrate(self.engine)
        # Reads that clients poll are answered on the event loop (`read_row`): a thread-pool hop
        # costs more than the read. PostgreSQL: psycopg's asyncio driver, so the loop never waits
        # on the network. SQLite: a local file in WAL mode, where a reader does not wait for a
        # writer; its own engine gives up after READ_ON_LOOP_TIMEOUT_S when the file is locked anyway.
        if self.engine.dialect.name == "sqlite":
            self.loop_engine: AsyncEngine | Engine = create_engine(url, connect_args={"timeout": READ_ON_LOOP_TIMEOUT_S})
            event.listen(self.loop_engine, "connect", _sqlite_pragmas)
        else:
            self.loop_engine = create_async_engine(self.engine.url)

    def session(self) -> Iterator[Session]:
        with self.sessions() as session:
            yield session

    async def read_row(self, statement: Executable, params: dict[str, Any]) -> Row | None:
        """The first row of a read-only statement, on the event loop (see __init__)."""
        if isinstance(self.loop_engine, AsyncEngine):
            async with self.loop_engine.connect() as connection:
                return (await connection.execute(statement, params)).first()
        with self.loop_engine.connect() as connection:
            return connection.execute(statement, params).first()


MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (api/migrations; Alembic). Idempotent; on
    PostgreSQL an advisory lock makes API replicas that start together migrate one at a time."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(727100)")
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def _sqlite_pragmas(dbapi_connection, _record):
    # WAL lets the request handlers read while the event consumer writes.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
