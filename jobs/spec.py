"""The job spec a client submits, and the message that carries it on `retrain.jobs`.

Two kinds of bounds keep a spec harmless, and they live in two places:

- the *shape* is fixed here, in the schema, so every reader of a job message (the API, the
  worker) holds it: hyperparameter names are identifier-like, values are scalars or flat lists
  of scalars (one line of text each), numbers are finite and fit 64 bits, `seed` fits the
  32-bit range every framework accepts, model/alias/version names match their patterns;
- the *sizes* are operator settings (`jobs/settings.py`, "Bounds on the job spec and the API's
  requests": the spec's bytes, the number of hyperparameters, each value's serialised bytes),
  checked by the API before and after it parses the spec (`api.submissions.parse_spec`).
  Pydantic validators cannot read the settings, and a size is a policy, not a schema.
"""

import json
import math
import re
from datetime import datetime
from typing import Literal
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator, model_validator

SCHEMA_VERSION = 1

MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
# An alias of a model ("latest", "production", ...).
ALIAS_PATTERN = r"^[a-z][a-z0-9_-]{0,31}$"
# A version in a URL: a number (at most 9 digits) or an alias.
VERSION_NUMBER_PATTERN = r"^[0-9]{1,9}$"
VERSION_PATTERN = r"^(?:[0-9]{1,9}|[a-z][a-z0-9_-]{0,31})$"
MAX_VERSION = 999_999_999
# Hyperparameter names become SageMaker hyperparameters.json keys, CLI-style flags and log
# text: identifier-like, so a name can never carry a newline, a quote or a JSON object.
HYPERPARAMETER_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$"
# A training image reference (registry/name:tag@digest): no spaces, no control characters.
IMAGE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/:@-]{0,254}$"
MAX_INT = 2**63 - 1
MAX_SEED = 2**32 - 1

_NAME = re.compile(HYPERPARAMETER_NAME_PATTERN.removesuffix("$") + r"\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class HyperparameterError(ValueError):
    """A hyperparameter that breaks the schema; `name` says which (for the 422's field)."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


def _check_scalar(name: str, value, where: str = "") -> None:
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        if not -MAX_INT - 1 <= value <= MAX_INT:
            raise HyperparameterError(name, f"{where}integer out of the 64-bit range")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise HyperparameterError(name, f"{where}number must be finite")
        return
    if isinstance(value, str):
        if _CONTROL.search(value):
            raise HyperparameterError(name, f"{where}text must be one line without control characters")
        return
    raise HyperparameterError(name, f"{where}must be a string, number, boolean or a flat list of those, not {type(value).__name__}")


def check_hyperparameter(name, value) -> None:
    """The schema's rule for one hyperparameter (name and value); raises HyperparameterError."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise HyperparameterError(str(name), f"name must match {HYPERPARAMETER_NAME_PATTERN} (letters, digits, _ . -)")
    if isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, list | dict):
                raise HyperparameterError(name, f"item {i}: lists must be flat (no nested lists or objects)")
            _check_scalar(name, item, f"item {i}: ")
        return
    _check_scalar(name, value)


def serialised_size(value) -> int:
    """Bytes of a value as it travels (compact JSON)."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


class Task(StrEnum):
    audio_classification = "audio_classification"  # CSV audio,label -> a classifier
    asr = "asr"  # CSV audio,text -> a CTC speech recogniser
    transcribe = "transcribe"  # CSV audio + a stored ASR version -> transcripts (no new model)


class Hyperparameters(BaseModel):
    """Known hyperparameters are checked here; trainer-specific extras pass through. Anything
    left unset takes the chosen trainer's own default (a CNN from scratch and a pretrained
    transformer want very different learning rates), so unset fields are not sent.

    Every name (known or extra) matches HYPERPARAMETER_NAME_PATTERN; an extra's value is a
    string (one line), a finite number, a boolean or a flat list of those."""

    model_config = ConfigDict(extra="allow")

    epochs: int | None = Field(None, ge=1, le=10_000)
    batch_size: int | None = Field(None, ge=1, le=4096)
    learning_rate: float | None = Field(None, gt=0, le=10)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    patience: int | None = Field(None, ge=1, le=10_000, description="epochs without validation improvement before stopping")
    keep: Literal["best", "last"] | None = Field(None, description="whose weights the model ships: the best validation "
                                                 "epoch's (early stopping on) or the final ones (the whole schedule)")

    @model_validator(mode="before")
    @classmethod
    def _check_extras(cls, values):
        if isinstance(values, dict):
            for name, value in values.items():
                check_hyperparameter(name, value)
        return values

    def for_trainer(self) -> dict:
        return self.model_dump(mode="json", exclude_none=True)


_VERSION_NUMBER = re.compile(VERSION_NUMBER_PATTERN.removesuffix("$") + r"\Z")
_ALIAS = re.compile(ALIAS_PATTERN.removesuffix("$") + r"\Z")


def parse_version_ref(value: int | str) -> int | str:
    """A version number (1..MAX_VERSION; digits in a string count) or an alias name; raises
    ValueError otherwise (str.isdigit would accept '²', int() would accept ' 3' and '٣')."""
    if isinstance(value, bool):
        raise ValueError("must be a version number or an alias name")
    if isinstance(value, str) and _VERSION_NUMBER.match(value):
        value = int(value)
    if isinstance(value, int):
        if not 1 <= value <= MAX_VERSION:
            raise ValueError(f"a version number is between 1 and {MAX_VERSION}")
        return value
    if isinstance(value, str) and _ALIAS.match(value):
        return value
    raise ValueError(f"must be a version number or an alias name ({ALIAS_PATTERN})")


class BaseModelRef(BaseModel):
    """A stored model version to start from: retraining without re-uploading the model."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(pattern=MODEL_NAME_PATTERN)
    version: StrictInt | StrictStr = Field("latest", description=f"a version number (1..{MAX_VERSION}), latest, or another alias ({ALIAS_PATTERN})")

    @field_validator("version")
    @classmethod
    def _version(cls, value):
        return parse_version_ref(value)


class Resources(BaseModel):
    """What the job's training container gets (docker runner); unset = the worker's defaults."""

    model_config = ConfigDict(extra="forbid")

    gpus: int | None = Field(None, ge=0, le=16, description="GPUs for the job; unset = 1 on a GPU worker, 0 on a CPU one")
    memory_mb: int | None = Field(None, ge=256)
    cpus: float | None = Field(None, gt=0)
    deadline_s: int | None = Field(None, ge=1, description="stop and fail the job with reason 'timeout' after this long")


# Metrics a champion / challenger decision can be made on (classification, higher is better).
PROMOTION_METRICS = ("accuracy", "macro_f1", "macro_precision", "macro_recall")


class PromoteSpec(BaseModel):
    """Promote the new version to `alias` only if it beats the alias's current holder on `metric`,
    both scored by the same code on the held-out set uploaded with the job (heldout +
    heldout_audio). Without a holder the new version takes the alias."""

    model_config = ConfigDict(extra="forbid")

    alias: str = Field(pattern=ALIAS_PATTERN, description="e.g. production; not latest, which moves by itself")
    metric: Literal[PROMOTION_METRICS] = "macro_f1"

    @field_validator("alias")
    @classmethod
    def _not_latest(cls, alias: str) -> str:
        if alias == "latest":
            raise ValueError("latest moves to every new version by itself; promote to another alias")
        return alias


class JobSpec(BaseModel):
    """What the client sends as the `spec` form field."""

    model_config = ConfigDict(extra="forbid")

    task: Task
    model_name: str = Field(pattern=MODEL_NAME_PATTERN, description="the stored model this job produces a version of")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    base: BaseModelRef | None = None
    image: str | None = Field(None, max_length=255, pattern=IMAGE_PATTERN, description="a training image of your own (SageMaker contract), from the operator's allow-list")
    resources: Resources = Field(default_factory=Resources)
    promote: PromoteSpec | None = None

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
    heldout: str | None = None  # spec.promote's held-out CSV, and its audio archive
    heldout_audio: str | None = None
    # Direct uploads (POST /v1/uploads): key -> the ETag of the content the API checked; the
    # worker reads exactly that content (a replaced object fails the job, never trains unchecked).
    etags: dict[str, str] = {}


class JobMessage(BaseModel):
    """The value of one `retrain.jobs` message (key = job id)."""

    schema_version: int = SCHEMA_VERSION
    job_id: str
    tenant: str = Field("local", pattern=r"^[a-z][a-z0-9-]{0,63}$")  # the submitting key's tenant: its models
    spec: JobSpec
    inputs: JobInputs
    trainer: str = "audio"  # built-in image/trainer folder: audio (PyTorch) or keras; spec.image wins
    base_version: int | None = None  # `spec.base` resolved at submit time
    submitted_at: datetime
