"""The schema before migrations existed: jobs, outbox, outbox_dead, job_events, api_keys, audit.

Each table is created only if it is missing: a database that `create_all` made before this
revision existed (any earlier version of the API) is brought here without losing a row.

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def tables() -> dict[str, list]:
    return {
        "jobs": [
            sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("id", sa.String(36), nullable=False, unique=True, index=True),
            sa.Column("state", sa.String(16), nullable=False, index=True),
            sa.Column("task", sa.String(32), nullable=False),
            sa.Column("model_name", sa.String(64), nullable=False),
            sa.Column("spec", sa.JSON, nullable=False),
            sa.Column("inputs", sa.JSON, nullable=False),
            sa.Column("base_version", sa.Integer),
            sa.Column("created_at", TZ, nullable=False),
            sa.Column("updated_at", TZ, nullable=False),
            sa.Column("started_at", TZ),
            sa.Column("finished_at", TZ),
            sa.Column("worker", sa.String(128)),
            sa.Column("attempts", sa.Integer, nullable=False),
            sa.Column("epoch", sa.Integer),
            sa.Column("epochs", sa.Integer),
            sa.Column("step", sa.Integer),
            sa.Column("metrics", sa.JSON, nullable=False),
            sa.Column("error", sa.Text),
            sa.Column("model_version", sa.Integer),
            sa.Column("outputs", sa.JSON, nullable=False),
        ],
        "outbox": [
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("topic", sa.String(255), nullable=False),
            sa.Column("key", sa.String(255), nullable=False),
            sa.Column("value", sa.Text, nullable=False),
            sa.Column("created_at", TZ, nullable=False),
        ],
        "outbox_dead": [
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("outbox_id", sa.Integer, nullable=False),
            sa.Column("topic", sa.String(255), nullable=False),
            sa.Column("key", sa.String(255), nullable=False),
            sa.Column("value", sa.Text, nullable=False),
            sa.Column("created_at", TZ, nullable=False),
            sa.Column("failed_at", TZ, nullable=False),
            sa.Column("error", sa.Text, nullable=False),
        ],
        "job_events": [
            sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("job_id", sa.String(36), nullable=False, index=True),
            sa.Column("type", sa.String(16), nullable=False),
            sa.Column("time", TZ, nullable=False),
            sa.Column("data", sa.JSON, nullable=False),
        ],
        "api_keys": [
            sa.Column("id", sa.String(32), primary_key=True),
            sa.Column("secret_hash", sa.String(64), nullable=False),
            sa.Column("tenant", sa.String(64), nullable=False, index=True),
            sa.Column("role", sa.String(16), nullable=False),
            sa.Column("name", sa.String(128)),
            sa.Column("created_at", TZ, nullable=False),
            sa.Column("created_by", sa.String(32)),
            sa.Column("expires_at", TZ),
            sa.Column("revoked_at", TZ),
        ],
        "audit": [
            sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("time", TZ, nullable=False, index=True),
            sa.Column("key_id", sa.String(32), nullable=False),
            sa.Column("tenant", sa.String(64), nullable=False, index=True),
            sa.Column("action", sa.String(32), nullable=False),
            sa.Column("resource", sa.String(255), nullable=False),
            sa.Column("detail", sa.JSON, nullable=False),
        ],
    }


def upgrade() -> None:
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    for name, columns in tables().items():
        if name not in existing:
            op.create_table(name, *columns)


def downgrade() -> None:
    for name in reversed(list(tables())):
        op.drop_table(name)
