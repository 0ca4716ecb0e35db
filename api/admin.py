"""`python -m api.admin`: API keys for operators, straight in the API's database (RETRAIN_DATABASE_URL).

    python -m api.admin create-key --tenant acme --role submit [--name ci] [--expires-days 90]
    python -m api.admin list-keys [--tenant acme]
    python -m api.admin revoke-key KEY_ID
    python -m api.admin local-key .run/admin.key     # what `make up` runs: a working admin key in that file

The key is printed once (create-key) or written with mode 600 (local-key); only its hash is stored.
"""

import argparse
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import select

from api.auth import KeyCache, Role, create_key, revoke_key
from api.db import ApiKey, Database
from jobs.settings import get_settings


def local_key(db: Database, path: Path) -> str:
    """The admin key in `path` if it is valid for this database; otherwise a new one written there."""
    if path.is_file():
        key = path.read_text().strip()
        if KeyCache(0).lookup(db, key) is not None:
            return "kept"
    with db.sessions() as session:
        _, key = create_key(session, "local", Role.admin, name="local stack admin (make up)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fp:
        fp.write(key + "\n")
    os.chmod(path, 0o600)
    return "created"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m api.admin", description="API keys of the retrain API")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("create-key")
    p.add_argument("--tenant", required=True)
    p.add_argument("--role", required=True, choices=[r.value for r in Role])
    p.add_argument("--name")
    p.add_argument("--expires-days", type=float)
    commands.add_parser("list-keys").add_argument("--tenant")
    commands.add_parser("revoke-key").add_argument("key_id")
    commands.add_parser("local-key").add_argument("path", type=Path)
    args = parser.parse_args(argv)

    db = Database(get_settings().database_url)
    if args.command == "local-key":
        print(f"admin key {local_key(db, args.path)} in {args.path}")
        return 0
    with db.sessions() as session:
        if args.command == "create-key":
            expires = datetime.now(UTC) + timedelta(days=args.expires_days) if args.expires_days else None
            row, key = create_key(session, args.tenant, Role(args.role), name=args.name, expires_at=expires)
            print(key)
            print(f"id {row.id}, tenant {row.tenant}, role {row.role}" + (f", expires {expires:%Y-%m-%d %H:%M} UTC" if expires else ""), file=sys.stderr)
        elif args.command == "list-keys":
            query = select(ApiKey).order_by(ApiKey.created_at)
            if args.tenant:
                query = query.where(ApiKey.tenant == args.tenant)
            for row in session.scalars(query):
                state = "revoked" if row.revoked_at else "active"
                print(f"{row.id}  {row.tenant:<16} {row.role:<7} {state:<8} {row.name or ''}")
        elif args.command == "revoke-key":
            if not revoke_key(session, args.key_id):
                print(f"no active key {args.key_id}", file=sys.stderr)
                return 1
            print(f"revoked {args.key_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
