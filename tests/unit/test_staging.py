import io
import tarfile
import zipfile

import pytest

from worker.events import parse_trainer_line
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


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        ('{"epoch": 1, "epochs": 3, "metrics": {"val_loss": 0.5}}', EventType.progress),
        ("Epoch 1: loss 0.5", EventType.log),
        ("{not json", EventType.log),
        ("[1, 2]", EventType.log),
    ],
)
def test_trainer_lines_are_progress_only_when_they_are_json_objects(line, kind):
    assert parse_trainer_line(line)[0] == kind
