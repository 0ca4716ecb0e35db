import io
import zipfile

import pytest

from api.validation import Archive, InputError, UploadLimits, check_audio_files, check_model_upload, read_manifest
from jobs.archive import ArchiveLimits
from jobs.spec import Task
from tests.unit.test_archive import make_tar, tar_file, tar_link, zip_bad_crc

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
    with pytest.raises(InputError, match="stay inside") as err:
        Archive(buffer, "audio", "a.zip").entries
    assert (err.value.field, err.value.file, err.value.status) == ("audio", "a.zip", 422)


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


LIMITS = UploadLimits(csv_max_bytes=1024 * 1024, csv_max_rows=20_000, csv_max_field_chars=300, csv_max_labels=3,
                      csv_max_label_chars=10, model_config_max_bytes=1000,
                      archive=ArchiveLimits(max_entries=100, max_total_bytes=8 * 1024 * 1024))


@pytest.mark.parametrize(
    ("csv", "row", "status", "says"),
    [
        (b"audio,label\na.wav,yes\nb.wav," + b"n" * 200_000 + b"\n", 3, 413, "limit is 300"),  # over csv's own 131,072
        (b"audio,label\na.wav,yes\n" + b"x" * 301 + b".wav,no\n", 3, 413, "limit is 300"),
        (b"audio,label\na.wav,yes\nb.wav,abcdefghijk\n", 3, 413, "label is 11 characters"),
        (b"audio,label\na.wav,a\nb.wav,b\nc.wav,c\nd.wav,d\n", 5, 413, "more than 3 distinct labels"),
        (b"audio,label\n" + b"a.wav,yes\nb.wav,no\n" * 10_001, 20_002, 413, "more than 20000 rows"),
        (b"audio,label\na.wav,yes\ndataset.csv,no\n", 3, 422, "kept for the CSV"),
        (b"audio,label\na.wav,yes\n./dataset.csv,no\n", 3, 422, "kept for the CSV"),
        (b"audio,label\na.wav,yes\nb\0.wav,no\n", 3, 422, "NUL"),
    ],
)
def test_csv_bounds_name_the_row(csv, row, status, says):
    with pytest.raises(InputError) as err:
        read_manifest(csv, TASK, "data.csv", LIMITS)
    assert (err.value.field, err.value.file, err.value.row, err.value.status) == ("dataset", "data.csv", row, status)
    assert says in err.value.message


def test_csv_over_its_byte_bound_is_refused_before_it_is_parsed():
    with pytest.raises(InputError) as err:
        read_manifest(b"audio,label\n" + b"a.wav,yes\n" * 200_000, TASK, "data.csv", LIMITS)
    assert err.value.status == 413 and "limit is 1048576" in err.value.message


def _wav(seconds: float = 0.1) -> bytes:
    import numpy as np
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(int(16000 * seconds), dtype="float32") + 0.1, 16000, format="WAV")
    return buffer.getvalue()


def test_each_member_is_decoded_once_however_many_rows_name_it(monkeypatch):
    import api.validation as validation

    decoded = []
    real = validation._check_decodes
    monkeypatch.setattr(validation, "_check_decodes", lambda path, name, row, filename: (decoded.append(name), real(path, name, row, filename)))
    csv = b"audio,label\n" + b"a.wav,yes\n" * 10_000 + b"b.wav,no\n"
    manifest = read_manifest(csv, TASK, "data.csv", LIMITS)
    archive = Archive(_zip({"a.wav": _wav(), "b.wav": _wav(), "unnamed.wav": b"never read"}), "audio", "a.zip", LIMITS.archive)
    check_audio_files(manifest, archive)
    assert sorted(decoded) == ["a.wav", "b.wav"]


def test_missing_member_and_undecodable_member_name_their_first_row():
    archive_data = _zip({"a.wav": _wav(), "bad.wav": b"RIFF nonsense"})
    manifest = read_manifest(b"audio,label\na.wav,yes\na.wav,yes\nmissing.wav,no\n", TASK, "d.csv", LIMITS)
    with pytest.raises(InputError) as err:
        check_audio_files(manifest, Archive(archive_data, "audio", "a.zip", LIMITS.archive))
    assert (err.value.field, err.value.row) == ("dataset", 4) and "not in the audio archive" in err.value.message
    manifest = read_manifest(b"audio,label\na.wav,yes\nbad.wav,no\nbad.wav,no\n", TASK, "d.csv", LIMITS)
    with pytest.raises(InputError) as err:
        check_audio_files(manifest, Archive(archive_data, "audio", "a.zip", LIMITS.archive))
    assert (err.value.field, err.value.file, err.value.row) == ("audio", "a.zip", 3) and "does not decode" in err.value.message


def test_named_member_with_a_bad_crc_is_refused():
    data = zip_bad_crc({"a.wav": _wav(), "b.wav": _wav(0.2)}, "b.wav")
    manifest = read_manifest(b"audio,label\na.wav,yes\nb.wav,no\n", TASK, "d.csv", LIMITS)
    with pytest.raises(InputError) as err:
        check_audio_files(manifest, Archive(io.BytesIO(data), "audio", "a.zip", LIMITS.archive))
    assert (err.value.field, err.value.file, err.value.status) == ("audio", "a.zip", 422)
    assert "'b.wav'" in err.value.message and "CRC" in err.value.message


@pytest.mark.parametrize(
    ("entries", "status", "says"),
    [
        ({"m/config.json": b'{"a": "' + b"x" * 2000 + b'"}'}, 413, "limit for a config file is 1000"),
        ({"m/preprocessor_config.json": b'{"auto_map": {"AutoFeatureExtractor": "x.Y"}}'}, 422, "custom code"),
        ({"m/config.json": b"{not json"}, 422, "not valid JSON"),
    ],
)
def test_model_configs_are_bounded_before_they_are_parsed(entries, status, says):
    with pytest.raises(InputError) as err:
        check_model_upload(_zip(entries), "m.zip", LIMITS)
    assert (err.value.field, err.value.file, err.value.status) == ("model", "m.zip", status)
    assert says in err.value.message


def test_model_config_nested_past_the_parsers_stack_is_refused():
    import dataclasses

    roomy = dataclasses.replace(LIMITS, model_config_max_bytes=10_000)
    with pytest.raises(InputError, match="not valid JSON") as err:
        check_model_upload(_zip({"m/config.json": b"[" * 4000 + b"]" * 4000}), "m.zip", roomy)
    assert err.value.status == 422


def test_model_archive_members_are_all_read_through():
    data = zip_bad_crc({"m/config.json": b"{}", "m/model.safetensors": b"\x08" + bytes(3000)}, "m/model.safetensors")
    with pytest.raises(InputError, match="CRC") as err:
        check_model_upload(io.BytesIO(data), "m.zip", LIMITS)
    assert err.value.field == "model"


def test_model_tar_with_a_link_is_refused():
    data = make_tar([tar_file("m/config.json", b"{}"), tar_link("m/model.safetensors", "/etc/shadow")])
    with pytest.raises(InputError, match="link") as err:
        check_model_upload(io.BytesIO(data), "m.tar.gz", LIMITS)
    assert (err.value.field, err.value.file) == ("model", "m.tar.gz")


def test_keras_config_is_bounded_and_keras_must_be_a_zip():
    with pytest.raises(InputError) as err:
        check_model_upload(_zip({"config.json": b"{" + b" " * 2000 + b"}"}), "big.keras", LIMITS)
    assert err.value.status == 413
    with pytest.raises(InputError, match="not a Keras v3"):
        check_model_upload(io.BytesIO(make_tar([tar_file("config.json", b"{}")])), "m.keras", LIMITS)


# ---- the same checks in a bounded child process (api/checker.py), as the API runs them ------

def _spooled(data: bytes):
    import tempfile

    f = tempfile.SpooledTemporaryFile()  # in memory, as Starlette keeps a small upload
    f.write(data)
    f.seek(0)
    return f


def test_the_child_check_answers_what_the_checks_found():
    from api.checker import CheckLimits, check_dataset

    audio = _spooled(_zip({"a.wav": _wav(), "b.wav": _wav()}).getvalue())
    dataset = _spooled(b"audio,label\na.wav,yes\nb.wav,no\nb.wav,no\n")
    summary = check_dataset(dataset, "d.csv", audio, "a.zip", TASK, LIMITS, CheckLimits())
    assert (summary.rows, summary.label_counts) == (3, {"yes": 1, "no": 2})
    assert dataset.tell() == 0 and audio.tell() == 0  # the uploads are stored from the start afterwards
    with pytest.raises(InputError) as err:
        check_dataset(_spooled(b"audio,label\na.wav,yes\nc.wav,no\n"), "d.csv", audio, "a.zip", TASK, LIMITS, CheckLimits())
    assert err.value.detail() == {"field": "dataset", "file": "d.csv", "row": 3, "error": "'c.wav' is not in the audio archive 'a.zip'"}


def test_a_check_over_its_memory_or_time_is_a_413_and_the_caller_lives():
    from api.checker import CheckLimits, check_dataset

    audio = _spooled(_zip({"a.wav": _wav(), "b.wav": _wav()}).getvalue())
    dataset = _spooled(b"audio,label\n" + b"a.wav,yes\n" * 99_000 + b"b.wav,no\n")
    with pytest.raises(InputError) as err:
        check_dataset(dataset, "d.csv", audio, "a.zip", TASK, LIMITS, CheckLimits(memory_bytes=256 * 1024**2))
    assert (err.value.field, err.value.file, err.value.status) == ("dataset", "d.csv", 413)
    with pytest.raises(InputError) as err:
        check_dataset(dataset, "d.csv", audio, "a.zip", TASK, LIMITS, CheckLimits(timeout_s=0.01))
    assert err.value.status == 413 and "time allowed" in err.value.message
