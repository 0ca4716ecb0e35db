"""Hostile uploads at the door: crafted CSVs, audio archives and model uploads each get a 4xx
that names the field and the file (and the row, for the CSV), leave nothing in the store, the
database or on Kafka, and come back at once (the archive reader runs in a bounded child
process). A normal submission is still accepted afterwards.

Runs the API in-process against the real Kafka and MinIO, on a bucket and topics of its own."""

import json
import os
import tarfile
import zipfile

import pytest

from tests.conftest import in_process_api, isolated, trainable_csv
from tests.integration.test_bad_input import assert_nothing_left, messages_on
from tests.unit.test_archive import (
    make_tar, make_zip, tar_file, tar_link, tar_negative_size, tar_pax_digits, tar_special, zip_bad_crc, zip_bomb,
    zip_encrypted, zip_overlapping, zip_renamed_raw, zip_symlink, zip_with_method, zlib_gzip,
)

pytestmark = pytest.mark.integration

SPEC = {"task": "audio_classification", "model_name": "hostile"}
MB = 1024 * 1024


@pytest.fixture(scope="module")
def app_settings(settings, tmp_path_factory):
    return isolated(
        settings, tmp_path_factory, "hostile-uploads",
        max_upload_bytes=16 * MB,
        # Bounds small enough to reach with small uploads; the field-size and ratio bounds keep
        # their defaults (8192 characters, 50x).
        csv_max_rows=20_000,
        csv_max_labels=50,
        archive_max_entries=500,
        archive_max_total_bytes=6 * MB,
        model_config_max_bytes=64 * 1024,
    )


@pytest.fixture(scope="module")
def client(app_settings):
    with in_process_api(app_settings) as c:
        yield c


def post(client, csv_text, audio=None, audio_name="audio.zip", model=None, model_name="model.zip"):
    files = {"dataset": ("dataset.csv", csv_text.encode() if isinstance(csv_text, str) else csv_text, "text/csv")}
    if audio is not None:
        files["audio"] = (audio_name, audio, "application/octet-stream")
    if model is not None:
        files["model"] = (model_name, model, "application/octet-stream")
    return client.post("/v1/jobs", data={"spec": json.dumps(SPEC)}, files=files)


def good_csv(clips, extra: str = "") -> str:
    return "audio,label\n" + "".join(f"{name},{label}\n" for name, _, label in clips) + extra


def entries(clips) -> dict[str, bytes]:
    return {name: data for name, data, _ in clips}


def tar_of(clips, *extra, mode="w:gz"):
    return make_tar([tar_file(name, data) for name, data, _ in clips] + list(extra), mode=mode)


# Each case: (id, build(clips) -> keyword arguments of post(), status, field, file, row, says).
CASES = [
    # ---- the CSV -------------------------------------------------------------------------
    ("csv-field-over-csv-module-limit", lambda c: {"csv_text": good_csv(c, f"{c[0][0]}," + "x" * 200_000 + "\n"), "audio": make_zip(entries(c))},
     413, "dataset", "dataset.csv", 4, "limit is 8192"),
    ("csv-field-over-the-bound", lambda c: {"csv_text": good_csv(c, "a" * 9000 + ".wav,yes\n"), "audio": make_zip(entries(c))},
     413, "dataset", "dataset.csv", 4, "limit is 8192"),
    ("csv-too-many-rows", lambda c: {"csv_text": "audio,label\n" + f"{c[0][0]},{c[0][2]}\n{c[1][0]},{c[1][2]}\n" * 10_001, "audio": make_zip(entries(c))},
     413, "dataset", "dataset.csv", 20_002, "more than 20000 rows"),
    ("csv-too-many-labels", lambda c: {"csv_text": "audio,label\n" + "".join(f"{c[0][0]},label{i}\n" for i in range(51)), "audio": make_zip(entries(c))},
     413, "dataset", "dataset.csv", 52, "more than 50 distinct labels"),
    ("csv-label-too-long", lambda c: {"csv_text": good_csv(c, f"{c[0][0]}," + "l" * 201 + "\n"), "audio": make_zip(entries(c))},
     413, "dataset", "dataset.csv", 4, "label is 201 characters"),
    ("csv-names-the-dataset-itself", lambda c: {"csv_text": good_csv(c, "dataset.csv,yes\n"), "audio": make_zip({**entries(c), "dataset.csv": c[0][1]})},
     422, "dataset", "dataset.csv", 4, "kept for the CSV"),
    ("csv-path-with-nul", lambda c: {"csv_text": good_csv(c, "clip\0.wav,yes\n"), "audio": make_zip(entries(c))},
     422, "dataset", "dataset.csv", 4, "NUL"),
    # One member named 10,000 times, then a missing one: every row is checked, the member is
    # extracted and decoded once, and the refusal names the last row.
    ("csv-one-member-ten-thousand-times", lambda c: {"csv_text": "audio,label\n" + f"{c[0][0]},{c[0][2]}\n" * 10_000 + f"{c[1][0]},{c[1][2]}\nnot/there.wav,x\n",
                                                     "audio": make_zip(entries(c))},
     422, "dataset", "dataset.csv", 10_003, "'not/there.wav' is not in the audio archive"),
    # ---- audio archives --------------------------------------------------------------------
    ("zip-bad-crc", lambda c: {"csv_text": good_csv(c), "audio": zip_bad_crc(entries(c), c[1][0])},
     422, "audio", "audio.zip", None, "crc"),
    ("zip-encrypted", lambda c: {"csv_text": good_csv(c), "audio": zip_encrypted(entries(c), c[0][0])},
     422, "audio", "audio.zip", None, "encrypted"),
    ("zip-unsupported-compression", lambda c: {"csv_text": good_csv(c), "audio": zip_with_method(entries(c), c[0][0], 9)},
     422, "audio", "audio.zip", None, "compression method 9"),
    ("zip-name-not-utf8", lambda c: {"csv_text": good_csv(c), "audio": zip_renamed_raw({**entries(c), "clip_X.wav": c[0][1]}, "clip_X.wav", b"clip_\xff.wav")},
     422, "audio", "audio.zip", None, "not valid utf-8"),
    ("zip-bomb-ratio", lambda c: {"csv_text": good_csv(c), "audio": make_zip({**entries(c), "zeros.wav": bytes(5 * MB)}, zipfile.ZIP_DEFLATED)},
     413, "audio", "audio.zip", None, "times its own size"),
    ("zip-bomb-alone", lambda c: {"csv_text": good_csv(c), "audio": zip_bomb(5 * MB)},
     413, "audio", "audio.zip", None, "compression bomb"),
    ("zip-overlapping-entries", lambda c: {"csv_text": good_csv(c), "audio": zip_overlapping(entries(c), c[0][0])},
     422, "audio", "audio.zip", None, "overlaps"),
    ("zip-symlink", lambda c: {"csv_text": good_csv(c), "audio": zip_symlink(entries(c), "evil.wav", "/etc/passwd")},
     422, "audio", "audio.zip", None, "link"),
    ("zip-duplicate-names", lambda c: {"csv_text": good_csv(c), "audio": make_zip({**entries(c), "./" + c[0][0]: c[1][1]})},
     422, "audio", "audio.zip", None, "appears twice"),
    ("zip-too-many-entries", lambda c: {"csv_text": good_csv(c), "audio": make_zip({**entries(c), **{f"pad/{i}.txt": b"" for i in range(500)}})},
     413, "audio", "audio.zip", None, "more than 500 entries"),
    ("zip-unpacks-over-the-total", lambda c: {"csv_text": good_csv(c), "audio": make_zip({**entries(c), "big.bin": os.urandom(6 * MB + 1)})},
     413, "audio", "audio.zip", None, "unpacks to more than 6291456 bytes"),
    ("zip-file-and-folder", lambda c: {"csv_text": good_csv(c), "audio": make_zip({**entries(c), "x": b"1", "x/y.wav": c[0][1]})},
     422, "audio", "audio.zip", None, "also the folder"),
    ("zip-entry-with-drive-letter", lambda c: {"csv_text": good_csv(c), "audio": make_zip({**entries(c), "C:/boot.wav": c[0][1]})},
     422, "audio", "audio.zip", None, "must be relative"),
    ("tar-gz-truncated", lambda c: {"csv_text": good_csv(c), "audio": tar_of(c)[: len(tar_of(c)) // 2], "audio_name": "audio.tar.gz"},
     422, "audio", "audio.tar.gz", None, "truncated"),
    ("tar-negative-member-size", lambda c: {"csv_text": good_csv(c), "audio": tar_negative_size([(n, d) for n, d, _ in c]), "audio_name": "audio.tar.gz"},
     422, "audio", "audio.tar.gz", None, "negative size"),
    ("tar-pax-header-of-digits", lambda c: {"csv_text": good_csv(c), "audio": tar_pax_digits([(n, d) for n, d, _ in c], digits=1_000_000), "audio_name": "audio.tar.gz"},
     422, "audio", "audio.tar.gz", None, "pax header is malformed"),
    ("tar-symlink", lambda c: {"csv_text": good_csv(c), "audio": tar_of(c, tar_link("evil.wav", "/etc/passwd")), "audio_name": "audio.tar.gz"},
     422, "audio", "audio.tar.gz", None, "link"),
    ("tar-hardlink", lambda c: {"csv_text": good_csv(c), "audio": tar_of(c, tar_link("hard.wav", c[0][0], tarfile.LNKTYPE)), "audio_name": "audio.tar.gz"},
     422, "audio", "audio.tar.gz", None, "link"),
    ("tar-fifo", lambda c: {"csv_text": good_csv(c), "audio": tar_of(c, tar_special("pipe", tarfile.FIFOTYPE), mode="w"), "audio_name": "audio.tar"},
     422, "audio", "audio.tar", None, "fifo"),
    ("tar-dotdot", lambda c: {"csv_text": good_csv(c), "audio": tar_of(c, tar_file("../../escape.wav", c[0][1])), "audio_name": "audio.tar.gz"},
     422, "audio", "audio.tar.gz", None, "stay inside"),
    ("gzip-that-is-not-a-tar", lambda c: {"csv_text": good_csv(c), "audio": zlib_gzip(c[0][1]), "audio_name": "audio.tar.gz"},
     422, "audio", "audio.tar.gz", None, "not a tar"),
    ("audio-not-an-archive", lambda c: {"csv_text": good_csv(c), "audio": c[0][1], "audio_name": "audio.wav"},
     422, "audio", "audio.wav", None, "not a zip or tar"),
    # ---- model uploads ---------------------------------------------------------------------
    ("model-config-over-the-bound", lambda c: {"csv_text": good_csv(c), "audio": make_zip(entries(c)),
                                               "model": make_zip({"m/config.json": b'{"pad": "' + b"x" * (64 * 1024) + b'"}'})},
     413, "model", "model.zip", None, "limit for a config file"),
    ("model-config-nested-deep", lambda c: {"csv_text": good_csv(c), "audio": make_zip(entries(c)),
                                            "model": make_zip({"m/config.json": b"[" * 5000 + b"]" * 5000})},
     422, "model", "model.zip", None, "not valid json"),
    ("model-feature-extractor-remote-code", lambda c: {"csv_text": good_csv(c), "audio": make_zip(entries(c)),
                                                       "model": make_zip({"m/config.json": b"{}", "m/preprocessor_config.json": b'{"auto_map": {"AutoFeatureExtractor": "evil.X"}}'})},
     422, "model", "model.zip", None, "custom code"),
    ("model-weights-bad-crc", lambda c: {"csv_text": good_csv(c), "audio": make_zip(entries(c)),
                                         "model": zip_bad_crc({"m/config.json": b"{}", "m/model.safetensors": os.urandom(4000)}, "m/model.safetensors")},
     422, "model", "model.zip", None, "crc"),
    ("model-tar-symlink", lambda c: {"csv_text": good_csv(c), "audio": make_zip(entries(c)), "model_name": "model.tar.gz",
                                     "model": make_tar([tar_file("m/config.json", b"{}"), tar_link("m/model.safetensors", "/etc/shadow")])},
     422, "model", "model.tar.gz", None, "link"),
    ("model-zip-bomb", lambda c: {"csv_text": good_csv(c), "audio": make_zip(entries(c)), "model": zip_bomb(5 * MB, "m/model.safetensors")},
     413, "model", "model.zip", None, "compression bomb"),
    ("model-keras-that-is-a-tar", lambda c: {"csv_text": good_csv(c), "audio": make_zip(entries(c)), "model_name": "model.keras",
                                             "model": make_tar([tar_file("config.json", b"{}")])},
     422, "model", "model.keras", None, "not a keras v3"),
    ("model-keras-config-over-the-bound", lambda c: {"csv_text": good_csv(c), "audio": make_zip(entries(c)), "model_name": "model.keras",
                                                     "model": make_zip({"config.json": b"{" + b" " * (64 * 1024) + b"}", "model.weights.h5": b""})},
     413, "model", "model.keras", None, "limit for a config file"),
    ("model-keras-encrypted", lambda c: {"csv_text": good_csv(c), "audio": make_zip(entries(c)), "model_name": "model.keras",
                                         "model": zip_encrypted({"config.json": b"{}", "model.weights.h5": b"w"}, "config.json")},
     422, "model", "model.keras", None, "encrypted"),
]


@pytest.mark.parametrize(("build", "status", "field", "file", "row", "says"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_hostile_upload_is_refused_and_leaves_nothing(client, app_settings, clips, build, status, field, file, row, says):
    response = post(client, **build(clips))
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert detail["field"] == field, detail
    assert detail["file"] == file, detail
    if row is not None:
        assert detail["row"] == row, detail
    assert says.lower() in detail["error"].lower(), detail
    assert_nothing_left(client, app_settings)


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 20
    assert len({case[0] for case in CASES}) == len(CASES)


def test_a_normal_submission_is_still_accepted(client, app_settings, clips):
    """Last in the file: after every hostile upload above, a good job is stored and queued, a
    tar.gz of the same clips as well, and a model upload with a plain config passes."""
    response = post(client, trainable_csv((name, label) for name, _, label in clips), make_zip(entries(clips)))
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert sorted(client.app_state.store.list_keys(f"jobs/{job_id}/")) == [f"jobs/{job_id}/inputs/audio.zip", f"jobs/{job_id}/inputs/dataset.csv"]
    model = make_zip({"m/config.json": b'{"model_type": "wav2vec2"}', "m/model.safetensors": b"\x08" + bytes(64)})
    response = post(client, trainable_csv((name, label) for name, _, label in clips), tar_of(clips), audio_name="audio.tar.gz", model=model)
    assert response.status_code == 202, response.text
    import time

    deadline = time.monotonic() + 20
    while messages_on(app_settings, app_settings.topic_jobs) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert messages_on(app_settings, app_settings.topic_jobs) == 2
