"""What the API answers: response models, separate from the storage models in db.py."""

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from jobs.spec import MAX_VERSION


class JobCreated(BaseModel):
    id: str
    state: str
    status_url: str


class Progress(BaseModel):
    epoch: int | None = None
    epochs: int | None = None
    step: int | None = None


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    state: str
    task: str
    model_name: str
    spec: dict[str, Any]
    base_version: int | None
    progress: Progress
    metrics: dict[str, Any]
    error: str | None
    model_version: int | None
    outputs: list[str] = []
    worker: str | None
    attempts: int
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    artifact_url: str | None = None


class JobList(BaseModel):
    items: list[JobOut]
    next_cursor: str | None


class ModelOut(BaseModel):
    name: str
    versions: int
    aliases: dict[str, int]


class AliasIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: StrictInt = Field(ge=1, le=MAX_VERSION)


class UploadIn(BaseModel):
    """POST /v1/uploads: the file the client is about to send straight to the store."""

    model_config = ConfigDict(extra="forbid")

    filename: str = Field(min_length=1, max_length=255, description="the file's name (kept, made safe, as its object's name)")
    size: StrictInt = Field(ge=1, description="its exact size in bytes: the store takes no other")


class UploadOut(BaseModel):
    id: str = Field(description="name it in POST /v1/jobs instead of the file: e.g. the form field audio=<id>")
    url: str = Field(description="POST a multipart form here: every field of `fields`, then the file as the field `file`")
    fields: dict[str, str]
    size: int
    expires_at: datetime
