"""Who is calling: API keys, roles, and the audit log.

A key reads `rtk_<id>_<secret>`: the id is public (it names the key in listings and the audit
log), the secret is 256 random bits stored only as its SHA-256. Clients send
`Authorization: Bearer <key>`. Missing, malformed, unknown, expired or revoked: 401. A valid key
whose role does not allow the call: 403.

Roles, each allowing what the one before allows:

    read    list and read jobs, events, logs, models, versions; download models and outputs
    submit  submit and cancel jobs, move aliases
    admin   create, list and revoke keys (any tenant), read the audit log

Every key belongs to a tenant, and acts within it: its jobs (api/routes/jobs.py answers 404 for
another tenant's) and its models (the store's tenant view, models_store/store.py `for_tenant`).
Each audit entry records the key and its tenant.

Validated keys are cached for `auth_cache_s` so a busy client costs no database query per
request; a revocation takes effect within that time.
"""

import functools
import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, status
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.db import ApiKey, AuditEntry, Database

KEY_PATTERN = re.compile(r"rtk_([a-f0-9]{16})_([A-Za-z0-9_-]{43})")
TENANT_PATTERN = r"^[a-z][a-z0-9-]{0,63}$"


class Role(StrEnum):
    read = "read"
    submit = "submit"
    admin = "admin"

    def allows(self, needed: "Role") -> bool:
        order = list(Role)
        return order.index(self) >= order.index(needed)


@dataclass(frozen=True)
class Caller:
    key_id: str
    tenant: str
    role: Role


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(session: Session, tenant: str, role: Role, *, name: str | None = None,
               expires_at: datetime | None = None, created_by: str | None = None) -> tuple[ApiKey, str]:
    """A new key, committed; returns its row and the key itself (shown once, never stored)."""
    key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    row = ApiKey(id=key_id, secret_hash=hash_secret(secret), tenant=tenant, role=Role(role).value, name=name,
                 expires_at=expires_at, created_by=created_by)
    session.add(row)
    session.commit()
    return row, f"rtk_{key_id}_{secret}"


def _aware(t: datetime | None) -> datetime | None:
    return t.replace(tzinfo=UTC) if t is not None and t.tzinfo is None else t


NOT_CACHED = object()  # KeyCache.lookup_cached: only the database can tell


class KeyCache:
    """Keys seen valid in the last `ttl_s` seconds (id -> (secret hash, caller, expiry, when checked))."""

    def __init__(self, ttl_s: float, size: int = 10_000):
        self.ttl_s, self.size = ttl_s, size
        self.entries: dict[str, tuple[str, Caller, datetime | None, float]] = {}
        self.lock = threading.Lock()

    def forget(self, key_id: str) -> None:
        with self.lock:
            self.entries.pop(key_id, None)

    def lookup(self, db: Database, key: str) -> Caller | None:
        """The caller a key names, or None; reads the database only when the cache has no fresh entry."""
        found = self.lookup_cached(key)
        if found is NOT_CACHED:
            key_id, secret = KEY_PATTERN.fullmatch(key).groups()
            found = _verified(secret, self._load(db, key_id))
        return found

    def lookup_cached(self, key: str) -> "Caller | None | object":
        """The caller from the cache alone (no database: the event loop may call it). None for a
        key that is not valid, NOT_CACHED when only the database can tell (`lookup`)."""
        match = KEY_PATTERN.fullmatch(key)
        if match is None:
            return None
        key_id, secret = match.groups()
        with self.lock:
            cached = self.entries.get(key_id)
        if cached is None or time.monotonic() - cached[3] > self.ttl_s:
            return NOT_CACHED
        return _verified(secret, cached)

    def _load(self, db: Database, key_id: str) -> tuple | None:
        with db.sessions() as session:
            row = session.get(ApiKey, key_id)
        if row is None or row.revoked_at is not None:
            self.forget(key_id)
            return None
        cached = (row.secret_hash, Caller(row.id, row.tenant, Role(row.role)), _aware(row.expires_at), time.monotonic())
        with self.lock:
            if len(self.entries) >= self.size:
                self.entries.clear()
            self.entries[key_id] = cached
        return cached


def _verified(secret: str, cached: tuple | None) -> Caller | None:
    """The cached key's caller if `secret` is its secret and it has not expired."""
    if cached is None:
        return None
    stored_hash, caller, expires_at, _ = cached
    if not hmac.compare_digest(stored_hash, hash_secret(secret)):
        return None
    if expires_at is not None and expires_at <= datetime.now(UTC):
        return None
    return caller


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail={"field": "Authorization", "error": message},
                         headers={"WWW-Authenticate": "Bearer"})


@functools.cache  # one dependency per role, so a router's and a route's are solved once per request
def require(role: Role):
    """A dependency: the caller, whose key must allow `role`. On the event loop: a cached key
    costs no thread-pool hop (on a busy API each hop costs more than the check itself)."""

    async def caller(request: Request) -> Caller:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if not header:
            raise _unauthorized("an API key is needed: send Authorization: Bearer <key>")
        if scheme.lower() != "bearer" or not key.strip():
            raise _unauthorized("send the key as Authorization: Bearer <key>")
        keys, key = request.app.state.keys, key.strip()
        found = keys.lookup_cached(key)
        if found is NOT_CACHED:
            found = await run_in_threadpool(keys.lookup, request.app.state.db, key)
        if found is None:
            raise _unauthorized("the API key is not valid (unknown, revoked or expired)")
        if not found.role.allows(role):
            raise HTTPException(status.HTTP_403_FORBIDDEN,
                                detail={"field": "Authorization", "error": f"this key's role ({found.role}) does not allow this; it needs {role}"})
        return found

    return caller


Reader = Annotated[Caller, Depends(require(Role.read))]
Submitter = Annotated[Caller, Depends(require(Role.submit))]
Admin = Annotated[Caller, Depends(require(Role.admin))]


def audit(session: Session, caller: Caller, action: str, resource: str, commit: bool = True, **detail: Any) -> None:
    """One audit entry (committed with the caller's own change when commit is False)."""
    session.add(AuditEntry(key_id=caller.key_id, tenant=caller.tenant, action=action, resource=resource[:255], detail=detail))
    if commit:
        session.commit()


def revoke_key(session: Session, key_id: str) -> bool:
    row = session.scalar(select(ApiKey).where(ApiKey.id == key_id))
    if row is None or row.revoked_at is not None:
        return False
    row.revoked_at = datetime.now(UTC)
    session.commit()
    return True
