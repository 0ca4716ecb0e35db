"""/v1/admin: keys and the audit log, for admins (api/auth.py)."""

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, Request, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from api.auth import TENANT_PATTERN, Admin, Role, audit, create_key, revoke_key
from api.db import ApiKey, AuditEntry
from api.deps import SessionDep

router = APIRouter(prefix="/v1/admin", tags=["admin"])


class KeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: str = Field(pattern=TENANT_PATTERN, description="the team the key acts for")
    role: Role
    name: str | None = Field(None, max_length=128, description="what the key is for")
    expires_at: datetime | None = Field(None, description="after this the key is refused (ISO 8601, with a time zone)")


class KeyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    tenant: str
    role: str
    name: str | None
    created_at: datetime
    created_by: str | None
    expires_at: datetime | None
    revoked_at: datetime | None


class KeyCreated(KeyOut):
    key: str = Field(description="the key itself: shown this once, stored only as a hash")


class AuditOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    seq: int
    time: datetime
    key_id: str
    tenant: str
    action: str
    resource: str
    detail: dict


@router.post("/keys", status_code=status.HTTP_201_CREATED, response_model=KeyCreated)
def new_key(body: KeyIn, caller: Admin, session: SessionDep) -> KeyCreated:
    row, key = create_key(session, body.tenant, body.role, name=body.name, expires_at=body.expires_at, created_by=caller.key_id)
    audit(session, caller, "key.create", row.id, tenant=row.tenant, role=row.role)
    return KeyCreated(**KeyOut.model_validate(row).model_dump(), key=key)


@router.get("/keys", response_model=list[KeyOut])
def list_keys(_caller: Admin, session: SessionDep, tenant: Annotated[str | None, Query(pattern=TENANT_PATTERN)] = None) -> list[KeyOut]:
    query = select(ApiKey).order_by(ApiKey.created_at)
    if tenant:
        query = query.where(ApiKey.tenant == tenant)
    return [KeyOut.model_validate(row) for row in session.scalars(query.limit(10_000))]


@router.delete("/keys/{key_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_key(key_id: Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,32}$", max_length=32)], request: Request, caller: Admin, session: SessionDep) -> None:
    if not revoke_key(session, key_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail={"field": "key_id", "error": f"no active key {key_id[:32]!r}"})
    request.app.state.keys.forget(key_id)
    audit(session, caller, "key.revoke", key_id)


@router.get("/audit", response_model=list[AuditOut])
def read_audit(
    _caller: Admin, session: SessionDep,
    tenant: Annotated[str | None, Query(pattern=TENANT_PATTERN)] = None,
    action: Annotated[str | None, Query(pattern=r"^[a-z][a-z._-]{0,31}$", max_length=32, description="e.g. job.submit")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[AuditOut]:
    """The newest entries first."""
    query = select(AuditEntry).order_by(AuditEntry.seq.desc()).limit(limit)
    if tenant:
        query = query.where(AuditEntry.tenant == tenant)
    if action:
        query = query.where(AuditEntry.action == action)
    return [AuditOut.model_validate(row) for row in session.scalars(query)]
