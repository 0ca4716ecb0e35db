import io
import tarfile
import zipfile

import pytest

from worker.events import PROGRESS_PREFIX, parse_trainer_line
from worker.staging import StagingError, safe_extract
from jobs.events import EventType


def _tar(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)


def test_tar_with_a_symlink_out_of_the_folder_is_refused(tmp_path):
    link = tarfile.TarInfo("evil")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    _tar(tmp_path / "a.tar.gz", [(link, None)])
    with pytest.raises(StagingError):
        safe_extract(tmp_path / "a.tar.gz", tmp_path / "out")


def test_tar_with_dotdot_is_refused(tmp_path):
    info = tarfile.TarInfo("../../escaped.txt")
    info.size = 2
    _tar(tmp_path / "a.tar.gz", [(info, b"hi")])
    with pytest.raises(StagingError):
        safe_extract(tmp_path / "a.tar.gz", tmp_path / "out" / "deep")
    assert not (tmp_path / "escaped.txt").exists()


def test_zip_extracts_inside_its_folder(tmp_path):
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
        zf.writestr("clips/a.wav", b"data")
    safe_extract(tmp_path / "a.zip", tmp_path / "out")
    assert (tmp_path / "out" / "clips" / "a.wav").read_bytes() == b"data"


TOKEN = "run-token-1"


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        (f'{PROGRESS_PREFIX} {TOKEN} {{"epoch": 1, "epochs": 3, "metrics": {{"val_loss": 0.5}}}}', EventType.progress),
        ('{"epoch": 1, "epochs": 3, "metrics": {"val_loss": 0.5}}', EventType.log),  # no channel token
        (f'{PROGRESS_PREFIX} forged {{"epoch": 1, "epochs": 3}}', EventType.log),
        ("Epoch 1: loss 0.5", EventType.log),
        (f"{PROGRESS_PREFIX} {TOKEN} {{not json", EventType.log),
    ],
)
def test_trainer_lines_are_progress_only_with_the_runs_token(line, kind):
    assert parse_trainer_line(line, TOKEN).type == kind


class FolderStore:
    """The store's reads, from a local folder (staging only reads)."""

    def __init__(self, root):
        self.root = root

    def download(self, key, dest, etag=None):
        dest.write_bytes((self.root / key).read_bytes())

    def feature_cache_prefix(self, name):
        return f"models/{name}/feature-cache/"

    def list_keys(self, prefix):
        folder = self.root / prefix
        return sorted(f"{prefix}{p.name}" for p in folder.iterdir()) if folder.is_dir() else []

    def size(self, key):
        return (self.root / key).stat().st_size


def _message(inputs):
    from datetime import datetime, timezone

    from jobs.spec import JobInputs, JobMessage, JobSpec

    spec = JobSpec.model_validate({"task": "audio_classification", "model_name": "m"})
    return JobMessage(job_id="job-1", spec=spec, inputs=JobInputs(**inputs), submitted_at=datetime.now(timezone.utc))


def test_staging_extracts_only_what_the_csv_names_and_keeps_the_validated_csv(tmp_path):
    from worker.staging import stage_inputs
    from worker.workspace import Workspace

    (tmp_path / "in").mkdir()
    csv_text = "audio,label\n./clips/a.wav,yes\nclips/a.wav,yes\nclips\\b.wav,no\n"
    (tmp_path / "in" / "dataset.csv").write_text(csv_text)
    with zipfile.ZipFile(tmp_path / "in" / "audio.zip", "w") as zf:
        zf.writestr("clips/a.wav", b"A")
        zf.writestr("clips/b.wav", b"B")
        zf.writestr("clips/unnamed.wav", b"C" * 1000)
        zf.writestr("dataset.csv", b"audio,label\n/etc/passwd,x\n")
    workspace = Workspace(tmp_path / "work")
    stage_inputs(FolderStore(tmp_path / "in"), _message({"dataset": "dataset.csv", "audio": "audio.zip"}), workspace)
    train = workspace.channel("train")
    assert sorted(str(p.relative_to(train)) for p in train.rglob("*") if p.is_file()) == ["clips/a.wav", "clips/b.wav", "dataset.csv"]
    assert (train / "dataset.csv").read_text() == csv_text


def test_staging_fails_when_a_named_member_is_missing_or_the_archive_is_hostile(tmp_path):
    from worker.staging import stage_inputs
    from worker.workspace import Workspace

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "dataset.csv").write_text("audio,label\na.wav,yes\nb.wav,no\n")
    with zipfile.ZipFile(tmp_path / "in" / "audio.zip", "w") as zf:
        zf.writestr("a.wav", b"A")
    with pytest.raises(StagingError, match="lacks 1 file"):
        stage_inputs(FolderStore(tmp_path / "in"), _message({"dataset": "dataset.csv", "audio": "audio.zip"}), Workspace(tmp_path / "w1"))
    link = tarfile.TarInfo("model/weights.safetensors")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    _tar(tmp_path / "in" / "model.tar", [(link, None)])
    with zipfile.ZipFile(tmp_path / "in" / "audio.zip", "a") as zf:
        zf.writestr("b.wav", b"B")
    with pytest.raises(StagingError, match="link"):
        inputs = {"dataset": "dataset.csv", "audio": "audio.zip", "base_model": "model.tar"}
        stage_inputs(FolderStore(tmp_path / "in"), _message(inputs), Workspace(tmp_path / "w2"))


def test_model_channel_is_extracted_whole(tmp_path):
    info = tarfile.TarInfo("config.json")
    info.size = 2
    weights = tarfile.TarInfo("sub/model.safetensors")
    weights.size = 3
    _tar(tmp_path / "model.tar.gz", [(info, b"{}"), (weights, b"abc")])
    assert sorted(safe_extract(tmp_path / "model.tar.gz", tmp_path / "out")) == ["config.json", "sub/model.safetensors"]
    assert (tmp_path / "out" / "sub" / "model.safetensors").read_bytes() == b"abc"


def test_staging_gives_the_model_s_feature_cache_as_the_cache_channel(tmp_path):
    """Only the cache's own file names, and only for the built-in audio trainer."""
    from worker.staging import stage_inputs
    from worker.workspace import Workspace

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "dataset.csv").write_text("audio,label\nclips/a.wav,yes\n")
    cache = tmp_path / "models" / "m" / "feature-cache"
    cache.mkdir(parents=True)
    (cache / "audio-16000.cache").write_bytes(b"\0" * 8)
    (cache / "audio-16000.json").write_text("{}")  # the format before 2026-12-03: not staged
    (cache / "notes.txt").write_text("not a cache file")
    message = _message({"dataset": "in/dataset.csv"})
    ws = Workspace(tmp_path / "ws")
    stage_inputs(FolderStore(tmp_path), message, ws)
    assert sorted(p.name for p in ws.channel("cache").iterdir()) == ["audio-16000.cache"]

    own_image = message.model_copy(update={"spec": message.spec.model_copy(update={"image": "acme/trainer:1"})})
    ws2 = Workspace(tmp_path / "ws2")
    stage_inputs(FolderStore(tmp_path), own_image, ws2)
    assert not ws2.channel("cache").exists()
