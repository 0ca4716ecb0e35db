"""The job spec a client submits, and the message that carries it on `retrain.jobs`."""

from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SCHEMA_VERSION = 1

MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"


class Task(StrEnum):
    audio_classification = "audio_classification"  # CSV audio,label -> a classifier
    asr = "asr"  # CSV audio,text -> a CTC speech recogniser
    transcribe = "transcribe"  # CSV audio + a stored ASR version -> transcripts (no new model)


class Hyperparameters(BaseModel):
    """Known hyperparameters are checked here; trainer-specific extras pass through. Anything
    left unset takes the chosen trainer's own default (a CNN from scratch and a pretrained
    transformer want very different learning rates), so unset fields are not sent."""

    model_config = ConfigDict(extra="allow")

    epochs: int | None = Field(None, ge=1, le=10_000)
    batch_size: int | None = Field(None, ge=1, le=4096)
    learning_rate: float | None = Field(None, gt=0, le=10)
    seed: int | None = None
    patience: int | None = Field(None, ge=1, description="epochs without validation improvement before stopping")

    def for_trainer(self) -> dict:
        return self.model_dump(mode="json", exclude_none=True)


class BaseModelRef(BaseModel):
    """A stored model version to start from: retraining without re-uploading the model."""

    model: str = Field(pattern=MODEL_NAME_PATTERN)
    version: int | Literal["latest"] = "latest"


class Resources(BaseModel):
    """What the job's training container gets (docker runner); unset = the worker's defaults."""

    model_config = ConfigDict(extra="forbid")

    gpus: int | None = Field(None, ge=0, le=16, description="GPUs for the job; unset = 1 on a GPU worker, 0 on a CPU one")
    memory_mb: int | None = Field(None, ge=256)
    cpus: float | None = Field(None, gt=0)
    deadline_s: int | None = Field(None, ge=1, description="stop and fail the job with reason 'timeout' after this long")


class JobSpec(BaseModel):
    """What the client sends as the `spec` form field."""

    model_config = ConfigDict(extra="forbid")

    task: Task
    model_name: str = Field(pattern=MODEL_NAME_PATTERN, description="the stored model this job produces a version of")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    base: BaseModelRef | None = None
    image: str | None = Field(None, max_length=255, description="a training image of your own (SageMaker contract), from the operator's allow-list")
    resources: Resources = Field(default_factory=Resources)

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
    trainer: str = "audio"  # built-in image/trainer folder: audio (PyTorch) or keras; spec.image wins
    base_version: int | None = None  # `spec.base` resolved at submit time
    submitted_at: datetime
