"""Staging: the job's inputs, from the store into a workspace laid out as the container contract.

Archives are read only through jobs.archive (the bounded reader the API validated them with):
of the audio archive only the members the validated CSV names are extracted, next to that CSV
and never over it; a model upload or a stored base version is extracted whole, through the same
reader and the same bounds."""

import csv
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from minio.error import S3Error

from jobs.archive import ArchiveError, ArchiveLimits, extract_archive, normalize_name
from jobs.settings import get_settings
from jobs.spec import JobMessage
from models_store import ModelStore
from worker.feature_cache import stage_feature_cache, uses_feature_cache
from worker.workspace import Workspace


class StagingError(RuntimeError):
    pass


def stage_inputs(store: ModelStore, message: JobMessage, workspace: Workspace, limits: ArchiveLimits | None = None) -> None:
    limits = limits or ArchiveLimits.from_settings(get_settings())
    spec, inputs = message.spec, message.inputs
    job = {**spec.model_dump(mode="json"), "job_id": message.job_id, "base_version": message.base_version}
    workspace.prepare(spec.hyperparameters.for_trainer(), job)

    stage_dataset(store, inputs.dataset, inputs.audio, workspace.channel("train"), limits, inputs.etags)

    cache = workspace.channel("cache")
    shutil.rmtree(cache, ignore_errors=True)
    if uses_feature_cache(message):
        stage_feature_cache(store, message, cache, get_settings().feature_cache_max_bytes)

    model = workspace.channel("model")
    shutil.rmtree(model, ignore_errors=True)
    if inputs.base_model:  # a stored version: its model.tar.gz
        fetch_and_extract(store, inputs.base_model, model, limits)
    elif inputs.model:  # the user's upload: an archive, or one file that keeps its name
        if inputs.model.endswith(("/model.zip", "/model.tar")):
            fetch_and_extract(store, inputs.model, model, limits)
        else:
            model.mkdir(parents=True)
            store.download(inputs.model, model / PurePosixPath(inputs.model).name)


def stage_dataset(store: ModelStore, csv_key: str, audio_key: str | None, channel: Path, limits: ArchiveLimits,
                  etags: Mapping[str, str] | None = None) -> None:
    """A channel of dataset.csv and the clips it names (only those: nothing else of the archive
    is written, and nothing can replace the validated CSV). `etags` (JobInputs.etags): a direct
    upload's archive is read only as the API checked it."""
    shutil.rmtree(channel, ignore_errors=True)
    channel.mkdir(parents=True)
    dataset = channel / "dataset.csv"
    store.download(csv_key, dataset)
    if audio_key:
        names = csv_audio_names(dataset)
        extracted = fetch_and_extract(store, audio_key, channel, limits, names, (etags or {}).get(audio_key))
        missing = sorted(names - set(extracted))
        if missing:
            raise StagingError(f"the audio archive lacks {len(missing)} file(s) the CSV names, e.g. {missing[0]!r}")


def csv_audio_names(path: Path) -> set[str]:
    """The archive members the (already validated) CSV names, spelled as the reader spells them."""
    field_limit = get_settings().csv_max_field_chars
    if csv.field_size_limit() <= field_limit:
        csv.field_size_limit(field_limit + 1)
    names = set()
    try:
        with path.open(newline="", encoding="utf-8-sig") as fp:
            reader = csv.reader(fp)
            header = [h.strip() for h in next(reader, [])]
            if "audio" not in header:
                raise StagingError("the dataset CSV has no audio column")
            column = header.index("audio")
            for values in reader:
                if len(values) > column and values[column].strip():
                    names.add(normalize_name(values[column].strip()))
    except (csv.Error, UnicodeDecodeError, ValueError) as err:
        raise StagingError(f"the dataset CSV cannot be read: {err}") from None
    return names


def fetch_and_extract(store: ModelStore, key: str, dest: Path, limits: ArchiveLimits, names: set[str] | None = None,
                      etag: str | None = None) -> list[str]:
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "archive"
        try:
            store.download(key, archive, etag)
        except S3Error as err:
            if err.code == "PreconditionFailed":
                raise StagingError(f"{key} was replaced after the API checked it; submit the job again") from None
            raise
        return safe_extract(archive, dest, limits, names)


def safe_extract(archive: Path, dest: Path, limits: ArchiveLimits | None = None, names: set[str] | None = None) -> list[str]:
    """Extract a zip or tar through the bounded reader: every entry is checked first (relative,
    inside, regular files only, within the count/size/ratio bounds), then only regular files are
    written under `dest`, never through a link nor over an existing file. `names` limits it to
    those members (all files when None). Returns the names written."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        return extract_archive(archive, dest, limits or ArchiveLimits.from_settings(get_settings()), names).names
    except ArchiveError as err:
        raise StagingError(f"archive refused: {err}") from None
