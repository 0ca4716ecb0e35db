"""What route functions get injected: settings, the database session and the store (as the
caller's tenant sees it)."""

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from api.auth import Reader
from jobs.settings import Settings
from models_store import ModelStore


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    yield from request.app.state.db.session()


def get_tenant_store(request: Request, caller: Reader) -> ModelStore:
    """The store as the caller's tenant sees it (its own model names; models_store/store.py)."""
    return request.app.state.store.for_tenant(caller.tenant)


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
TenantStoreDep = Annotated[ModelStore, Depends(get_tenant_store)]
