"""The schema is Alembic's (api/migrations): a new database gets it whole, and a database made by
an API from before migrations (create_all, no tenant column) is upgraded in place, rows kept."""

import sqlite3

import sqlalchemy as sa

from api.db import Database, Job


def test_a_database_from_before_migrations_is_upgraded_with_its_rows(tmp_path):
    import importlib.util

    from api.db import MIGRATIONS

    spec = importlib.util.spec_from_file_location("initial", MIGRATIONS / "versions" / "0001_initial.py")
    initial = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(initial)
    path = tmp_path / "old.db"
    engine = sa.create_engine(f"sqlite:///{path}")
    metadata = sa.MetaData()
    jobs = sa.Table("jobs", metadata, *initial.tables()["jobs"])
    metadata.create_all(engine)  # what an API before migrations (and before tenants) made
    with engine.begin() as connection:
        connection.execute(jobs.insert().values(
            id="old-job", state="succeeded", task="audio_classification", model_name="m", spec={}, inputs={},
            created_at=sa.func.now(), updated_at=sa.func.now(), attempts=1, metrics={}, outputs=[]))
    engine.dispose()

    db = Database(f"sqlite:///{path}")
    with db.sessions() as session:
        job = session.scalar(sa.select(Job).where(Job.id == "old-job"))
        assert (job.state, job.tenant) == ("succeeded", "local")
    tables = {row[0] for row in sqlite3.connect(path).execute("select name from sqlite_master where type = 'table'")}
    assert {"jobs", "outbox", "outbox_dead", "job_events", "api_keys", "audit", "alembic_version"} <= tables
    Database(f"sqlite:///{path}")  # and again: nothing left to do
    assert sqlite3.connect(path).execute("select version_num from alembic_version").fetchall() == [("0004",)]
