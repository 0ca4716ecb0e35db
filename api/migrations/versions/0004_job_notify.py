"""PostgreSQL tells every API replica which job rows change (api/job_cache.py): after each insert,
update or delete of a jobs row, a NOTIFY on channel `retrain_jobs` with the job's id. Whoever
writes the row (any replica's routes, its event consumer, an operator's CLI or psql) sends it.
SQLite has no NOTIFY and no cache: nothing to do there.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("""
        CREATE FUNCTION retrain_notify_job_change() RETURNS trigger AS $$
        BEGIN
            IF TG_OP = 'DELETE' THEN
                PERFORM pg_notify('retrain_jobs', OLD.id);
            ELSE
                PERFORM pg_notify('retrain_jobs', NEW.id);
            END IF;
            RETURN NULL;
        END
        $$ LANGUAGE plpgsql
    """)
    op.execute("""
        CREATE TRIGGER jobs_notify_change AFTER INSERT OR UPDATE OR DELETE ON jobs
        FOR EACH ROW EXECUTE FUNCTION retrain_notify_job_change()
    """)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS jobs_notify_change ON jobs")
    op.execute("DROP FUNCTION IF EXISTS retrain_notify_job_change()")
