"""Staging: the job's inputs, from the store into a workspace laid out as the container contract."""

import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from jobs.spec import JobMessage
from models_store import ModelStore
from worker.workspace import Workspace


class StagingError(RuntimeError):
    pass


def stage_inputs(store: ModelStore, message: JobMessage, workspace: Workspace) -> None:
    spec, inputs = message.spec, message.inputs
    job = {**spec.model_dump(mode="json"), "job_id": message.job_id, "base_version": message.base_version}
    workspace.prepare(spec.hyperparameters.for_trainer(), job)

    train = workspace.channel("train")
    shutil.rmtree(train, ignore_errors=True)
    train.mkdir(parents=True)
    store.download(inputs.dataset, train / "dataset.csv")
    if inputs.audio:
        _fetch_and_extract(store, inputs.audio, train)

    model = workspace.channel("model")
    shutil.rmtree(model, ignore_errors=True)
    if inputs.base_model:  # a stored version: its model.tar.gz
        _fetch_and_extract(store, inputs.base_model, model)
    elif inputs.model:  # the user's upload: an archive, or one file that keeps its name
        if inputs.model.endswith(("/model.zip", "/model.tar")):
            _fetch_and_extract(store, inputs.model, model)
        else:
            model.mkdir(parents=True)
            store.download(inputs.model, model / PurePosixPath(inputs.model).name)


def _fetch_and_extract(store: ModelStore, key: str, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "archive"
        store.download(key, archive)
        safe_extract(archive, dest)


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a zip or tar so that nothing lands outside `dest`: no absolute paths, no '..', no
    links or devices (tarfile's 'data' filter), whatever the archive claims."""
    dest = dest.resolve()
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                target = (dest / info.filename).resolve()
                if not target.is_relative_to(dest) or PurePosixPath(info.filename).is_absolute():
                    raise StagingError(f"archive entry {info.filename!r} points outside its folder")
            zf.extractall(dest)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive, "r:*") as tar:
            try:
                tar.extractall(dest, filter="data")
            except tarfile.FilterError as err:
                raise StagingError(f"archive entry refused: {err}") from None
    else:
        raise StagingError(f"{archive.name} is not a zip or tar archive")
