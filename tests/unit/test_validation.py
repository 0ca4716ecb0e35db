import io
import zipfile

import pytest

from api.validation import Archive, InputError, check_model_upload, read_manifest
from jobs.spec import Task

TASK = Task.audio_classification


def test_manifest_rows_labels_and_optional_split():
    manifest = read_manifest(b"audio,label,split\n./a.wav,yes,train\nb/c.wav,no,test\n", TASK)
    assert manifest.audio_paths == ["a.wav", "b/c.wav"]
    assert manifest.label_counts == {"yes": 1, "no": 1}


def test_header_whitespace_and_bom_are_tolerated():
    manifest = read_manifest("\ufeffaudio , label\na.wav,yes\nb.wav,no\n".encode(), TASK)
    assert manifest.label_counts == {"yes": 1, "no": 1}


@pytest.mark.parametrize(
    ("csv", "row", "says"),
    [
        (b"audio,label\na.wav,yes\n,no\n", 3, "empty 'audio'"),
        (b"audio,label\na.wav,yes\nb.wav,\n", 3, "empty 'label'"),
        (b"audio,label,split\na.wav,yes,train\nb.wav,no,holdout\n", 3, "split must be one of"),
        (b"audio,label\na.wav,yes\n/etc/passwd,no\n", 3, "must be relative"),
        (b"audio,label\na.wav,yes\n../../x.wav,no\n", 3, "must be relative"),
        (b"audio,label\n", None, "no rows"),
    ],
)
def test_bad_rows_are_named(csv, row, says):
    with pytest.raises(InputError) as err:
        read_manifest(csv, TASK)
    assert err.value.row == row
    assert says in err.value.message


def test_zip_entry_escaping_the_archive_is_refused():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("ok.wav", b"x")
        zf.writestr("../escape.wav", b"x")
    with pytest.raises(InputError, match="stay inside"):
        Archive(buffer, "audio", "a.zip")


def test_model_upload_kinds():
    assert check_model_upload(io.BytesIO(b"ONNX-ish bytes"), "m.onnx") == "file"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    assert check_model_upload(buffer, "m.zip") == "zip"


def test_torch_save_archive_is_refused_as_pickle():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    with pytest.raises(InputError, match="pickle"):
        check_model_upload(buffer, "model.pt")


def _zip(entries: dict[str, bytes]) -> io.BytesIO:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    buffer.seek(0)
    return buffer


def test_hugging_face_dir_asking_for_remote_code_is_refused():
    config = b'{"model_type": "wav2vec2", "auto_map": {"AutoModel": "modeling_evil.EvilModel"}}'
    with pytest.raises(InputError, match="custom code"):
        check_model_upload(_zip({"base/config.json": config, "base/model.safetensors": b"x"}), "base.zip")
    with pytest.raises(InputError, match="Python code"):
        check_model_upload(_zip({"base/config.json": b"{}", "base/modeling_evil.py": b"import os"}), "base.zip")


def test_keras_file_with_a_lambda_layer_is_refused():
    config = b'{"class_name": "Sequential", "config": {"layers": [{"class_name": "Lambda", "config": {"function": "..."}}]}}'
    with pytest.raises(InputError, match="Lambda"):
        check_model_upload(_zip({"config.json": config, "model.weights.h5": b""}), "model.keras")
    plain = b'{"class_name": "Sequential", "config": {"layers": [{"class_name": "Dense"}]}}'
    assert check_model_upload(_zip({"config.json": plain, "model.weights.h5": b""}), "model.keras") == "file"
