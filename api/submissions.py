"""Accepting a job: the uploads arrive already stored (api/intake.py streams each file to the store
and to a spool file as it is received); check everything on the spool files, then write the job
and its Kafka message in one database transaction (the outbox). A refused job leaves nothing in
the store or on Kafka: its inputs are deleted again."""

import io
import re
from dataclasses import dataclass

from pydantic import ValidationError
from sqlalchemy.orm import Session

from api.db import Job, OutboxMessage
from api.auth import Caller, audit
from api.checker import CheckLimits, DatasetSummary, check_dataset
from api.intake import Upload
from api.validation import InputError, UploadLimits, archive_kind, check_model_upload
from jobs import splits
from jobs.events import EventType, JobEvent, JobState, utcnow
from jobs.settings import Settings
from jobs.spec import JobInputs, JobMessage, JobSpec, Task
from models_store import ModelStore, VersionInfo


@dataclass
class Uploads:
    """The files of one submission (form fields of POST /v1/jobs)."""

    dataset: Upload
    audio: Upload | None = None
    model: Upload | None = None
    heldout: Upload | None = None  # spec.promote's held-out CSV ...
    heldout_audio: Upload | None = None  # ... and the archive of the clips it names

    def present(self) -> list[tuple[str, Upload]]:
        return [(field, upload) for field, upload in vars(self).items() if upload is not None]


def parse_spec(text: str, settings: Settings | None = None) -> JobSpec:
    """The `spec` form field -> a JobSpec, or an InputError whose field names the part at fault
    (`spec`, `spec.task`, `spec.hyperparameters.<name>`, ...). The schema (jobs/spec.py) fixes
    the shape; the sizes are settings: the field's bytes before it is parsed (413), the number
    of hyperparameters (422) and each value's serialised bytes (413)."""
    from jobs.settings import get_settings
    from jobs.spec import HyperparameterError, serialised_size

    settings = settings or get_settings()
    limit = settings.max_spec_bytes
    # Characters are at least one byte each: a long text is refused without encoding it.
    if len(text) > limit or len(text.encode("utf-8", "surrogatepass")) > limit:
        raise InputError("spec", f"the spec is over the limit of {limit} bytes", status=413)
    try:
        spec = JobSpec.model_validate_json(text)
    except ValidationError as err:
        first = err.errors()[0]
        cause = (first.get("ctx") or {}).get("error")
        if isinstance(cause, HyperparameterError):
            # The name as text a log line cannot be fooled by (a newline shows as \\n).
            name = cause.name[:64].encode("unicode_escape").decode("ascii")
            raise InputError(f"spec.hyperparameters.{name}", str(cause)) from None
        # Union members add a tag to the location (base.version.int): not a field name.
        loc = [str(p) for p in first["loc"]]
        while len(loc) > 1 and (loc[-1] in ("int", "str", "float", "bool") or loc[-1].startswith(("constrained-", "function-", "literal["))):
            loc.pop()
        where = ".".join(loc)
        raise InputError(f"spec.{where}" if where else "spec", first["msg"]) from None
    hyperparameters = spec.hyperparameters
    names = hyperparameters.model_fields_set | set(hyperparameters.model_extra or {})  # the set one includes extras
    if len(names) > settings.max_hyperparameters:
        raise InputError("spec.hyperparameters", f"{len(names)} hyperparameters; at most {settings.max_hyperparameters} are allowed")
    for name, value in hyperparameters.for_trainer().items():
        size = serialised_size(value)
        if size > settings.max_hyperparameter_value_bytes:
            raise InputError(
                f"spec.hyperparameters.{name}",
                f"value is {size} bytes as JSON; the limit is {settings.max_hyperparameter_value_bytes}", status=413)
    return spec


def input_key(store: ModelStore, job_id: str, field: str, filename: str, head: bytes) -> str:
    """Where an upload is stored, from its field, its name and its first bytes: jobs/<id>/inputs/
    dataset.csv, audio.zip or audio.tar, model.zip, model.tar or model/<its name>, heldout.csv,
    heldout_audio.zip or .tar. The worker extracts the archives (an archive kind's name) into
    their channel; a single model file keeps its name there."""
    prefix = store.job_prefix(job_id) + "inputs/"
    if field in ("dataset", "heldout"):
        return f"{prefix}{field}.csv"
    kind = archive_kind(io.BytesIO(head))
    if field == "model":
        if filename.lower().endswith(".keras") or kind is None:  # a .keras file is a zip kept whole
            return f"{prefix}model/{safe_name(filename, 'model')}"
        return f"{prefix}model.{kind}"
    return f"{prefix}{field}.{'zip' if kind == 'zip' else 'tar'}"


def submit_job(job_id: str, spec: JobSpec, uploads: Uploads, store: ModelStore, session: Session, settings: Settings,
               caller: Caller) -> Job:
    """The job, checked and committed; raises the InputError of the first check that refused it.
    `spec` is parse_spec's (the intake parsed it as it arrived, within this app's bounds). Either
    way the uploads' objects are the caller's to delete when no job is returned."""
    dataset, audio, model = uploads.dataset, uploads.audio, uploads.model
    for field, upload in uploads.present():
        if upload.size > settings.max_upload_bytes:
            raise InputError(field, f"is {upload.size} bytes; the limit is {settings.max_upload_bytes}", file=upload.filename, status=413)
    _check_promotion(spec, uploads)

    if spec.image is not None and not any(spec.image.startswith(prefix) for prefix in settings.allowed_images):
        raise InputError("spec.image", f"image {spec.image!r} is not allowed here; allowed prefixes: {settings.allowed_images}")

    base = None
    if spec.base is not None:
        base = store.find_version(spec.base.model, spec.base.version)
        if base is None:
            raise InputError("spec.base", f"model {spec.base.model!r} has no version {spec.base.version!r}")
    base_version = base.version if base else None

    if spec.task == Task.transcribe and spec.base is None and model is None:
        raise InputError("spec.base", "a transcribe job needs an ASR model: name a stored version in base, or upload one")

    # The uploads' bounds (jobs/settings.py); archives are read only by the bounded reader.
    limits = UploadLimits.from_settings(settings)
    if dataset.size > limits.csv_max_bytes:
        raise InputError("dataset", f"is {dataset.size} bytes; the limit is {limits.csv_max_bytes}", file=dataset.filename, status=413)
    # The CSV, and each clip it names, checked in a bounded child process (api/checker.py).
    summary = check_dataset(dataset.file, dataset.filename, audio.file if audio else None, audio.filename if audio else None,
                            spec.task, limits, CheckLimits.from_settings(settings))
    heldout, heldout_audio = uploads.heldout, uploads.heldout_audio
    if heldout is not None:  # the same checks as the training set, in the same bounded child
        if heldout.size > limits.csv_max_bytes:
            raise InputError("heldout", f"is {heldout.size} bytes; the limit is {limits.csv_max_bytes}", file=heldout.filename, status=413)
        check_dataset(heldout.file, heldout.filename, heldout_audio.file if heldout_audio else None,
                      heldout_audio.filename if heldout_audio else None, spec.task, limits, CheckLimits.from_settings(settings),
                      fields=("heldout", "heldout_audio"))
    if model:
        check_model_upload(model.file, model.filename, limits)
    trainer = choose_trainer(model, base)
    if spec.task == Task.audio_classification and trainer == "audio":
        _check_splits(spec, summary, dataset.filename)

    # Everything checked: commit the job and its messages together.
    inputs = JobInputs(dataset=dataset.key, audio=audio.key if audio else None, model=model.key if model else None,
                       heldout=heldout.key if heldout else None, heldout_audio=heldout_audio.key if heldout_audio else None,
                       etags={upload.key: upload.etag for _, upload in uploads.present() if upload.etag})
    if base_version is not None:
        inputs.base_model = store.artifact_key(spec.base.model, base_version)
    try:
        now = utcnow()
        message = JobMessage(job_id=job_id, tenant=caller.tenant, spec=spec, inputs=inputs, trainer=trainer, base_version=base_version, submitted_at=now)
        job = Job(
            id=job_id, tenant=caller.tenant, state=JobState.queued, task=spec.task, model_name=spec.model_name,
            spec=spec.model_dump(mode="json"), inputs=inputs.model_dump(mode="json"),
            base_version=base_version, created_at=now, updated_at=now, metrics={},
        )
        accepted = JobEvent(job_id=job_id, type=EventType.accepted, time=now, data={"model_name": spec.model_name})
        session.add(job)
        session.add(OutboxMessage(topic=settings.topic_jobs, key=job_id, value=message.model_dump_json()))
        session.add(OutboxMessage(topic=settings.topic_events, key=job_id, value=accepted.model_dump_json()))
        audit(session, caller, "job.submit", job_id, commit=False, model_name=spec.model_name, task=spec.task.value)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return job


def _check_splits(spec: JobSpec, summary: DatasetSummary, filename: str) -> None:
    """The built-in classification trainers' split rule (jobs/splits.py), here rather than minutes
    later in the trainer: a class too small to hold out its validation and test clips is a 422
    naming it and its first row."""
    given = spec.hyperparameters.for_trainer()
    fractions = {name: given.get(name, default) for name, default in
                 (("validation_fraction", splits.VALIDATION_FRACTION), ("test_fraction", splits.TEST_FRACTION))}
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in fractions.values()):
        return  # not numbers: the trainer's own argument check names them
    if not (0 < fractions["validation_fraction"] < 0.5 and 0 <= fractions["test_fraction"] < 0.5):
        return  # outside the trainer's bounds (its args.py): its own check names them
    refusal = splits.split_refusal(summary.by_split, **fractions)
    if refusal is not None:
        label, why = refusal
        raise InputError("dataset", why, row=summary.first_rows.get(label), file=filename)


def _check_promotion(spec: JobSpec, uploads: Uploads) -> None:
    """spec.promote needs its held-out set; a held-out set is only for spec.promote."""
    if spec.promote is None:
        for field in ("heldout", "heldout_audio"):
            if getattr(uploads, field) is not None:
                raise InputError(field, "a held-out set is only used to decide a promotion: set spec.promote too")
        return
    if spec.task != Task.audio_classification:
        raise InputError("spec.promote", f"champion / challenger promotion is for audio_classification jobs, not {spec.task.value}")
    if uploads.heldout is None:
        raise InputError("heldout", "spec.promote needs the held-out set both versions are scored on: "
                         "upload it as heldout (CSV) and heldout_audio (archive)")


def choose_trainer(model: Upload | None, base: VersionInfo | None) -> str:
    """Which built-in image trains the job: Keras models stay in the TensorFlow image (an
    uploaded .keras file, or a stored version that came out of it); everything else is PyTorch."""
    if model is not None and model.filename.lower().endswith(".keras"):
        return "keras"
    if base is not None and base.trainer == "keras":
        return "keras"
    return "audio"


def safe_name(filename: str, default: str = "upload") -> str:
    """A client's file name as an object's name: its last component, characters outside
    [A-Za-z0-9._-] replaced, no leading dot."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", filename.replace("\\", "/").rsplit("/", 1)[-1]).lstrip(".")
    return name[:128] or default
