"""The job spec a client submits, and the message that carries it on `retrain.jobs`."""

from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SCHEMA_VERSION = 1

MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"


class Task(StrEnum):
    audio_classification = "audio_classification"


class Hyperparameters(BaseModel):
    """Known hyperparameters get defaults and bounds; trainer-specific extras pass through."""

    model_config = ConfigDict(extra="allow")

    epochs: int = Field(30, ge=1, le=10_000)
    batch_size: int = Field(32, ge=1, le=4096)
    learning_rate: float = Field(1e-3, gt=0, le=10)
    seed: int = 0
    patience: int = Field(8, ge=1, description="epochs without validation improvement before stopping")


class BaseModelRef(BaseModel):
    """A stored model version to start from: retraining without re-uploading the model."""

    model: str = Field(pattern=MODEL_NAME_PATTERN)
    version: int | Literal["latest"] = "latest"


class JobSpec(BaseModel):
    """What the client sends as the `spec` form field."""

    model_config = ConfigDict(extra="forbid")

    task: Task
    model_name: str = Field(pattern=MODEL_NAME_PATTERN, description="the stored model this job produces a version of")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    base: BaseModelRef | None = None

    @field_validator("hyperparameters", mode="before")
    @classmethod
    def _none_is_default(cls, value):
        return {} if value is None else value


class JobInputs(BaseModel):
    """Where the API put the job's uploads in the store (object keys)."""

    dataset: str
    audio: str | None = None
    model: str | None = None
    base_model: str | None = None  # artifact of the resolved stored base version


class JobMessage(BaseModel):
    """The value of one `retrain.jobs` message (key = job id)."""

    schema_version: int = SCHEMA_VERSION
    job_id: str
    spec: JobSpec
    inputs: JobInputs
    base_version: int | None = None  # `spec.base` resolved at submit time
    submitted_at: datetime
