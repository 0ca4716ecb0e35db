"""The SDK's pieces that need no server: the event-stream parser, refusals as one line, --hp
values, and zipping a folder of clips (tests/e2e/test_cli.py runs the command on the real service)."""

import zipfile

import httpx
import pytest

from retrain.cli import describe, parse_hp
from retrain.client import ApiError, parse_sse, zip_folder


def test_server_sent_events_are_parsed_with_ids_comments_and_multiline_data():
    lines = ["id: 7", 'data: {"type": "started"}', "", ": keep-alive", "", "id: 8", 'data: {"type":', 'data: "progress", "epoch": 2}', ""]
    assert list(parse_sse(lines)) == [("7", {"type": "started"}), ("8", {"type": "progress", "epoch": 2})]


def test_a_refusal_is_the_one_line_a_user_needs():
    response = httpx.Response(422, json={"detail": {"field": "dataset", "file": "words.csv", "row": 3, "error": "'c.wav' is not in the audio archive"}})
    assert str(ApiError.from_response(response)) == "words.csv, row 3, field dataset: 'c.wav' is not in the audio archive"
    assert str(ApiError.from_response(httpx.Response(502, text="<html>bad gateway</html>"))).startswith("502 Bad Gateway")


def test_hyperparameters_are_json_values_or_strings():
    assert parse_hp(["epochs=5", "lr=1e-3", "augment=true", "name=small", "layers=[1,2]"]) == {
        "epochs": 5, "lr": 0.001, "augment": True, "name": "small", "layers": [1, 2]}
    with pytest.raises(SystemExit):
        parse_hp(["epochs"])


def test_progress_reads_as_a_line():
    assert describe({"type": "progress", "epoch": 3, "epochs": 10, "metrics": {"val_accuracy": 0.81234, "loss": 0.5}}) == \
        "epoch 3/10  loss=0.5  val_accuracy=0.8123"
    assert describe({"type": "failed", "reason": "out_of_memory"}) == "failed: out_of_memory"


def test_a_folder_is_zipped_with_the_files_the_csv_names(tmp_path):
    (tmp_path / "clips" / "a").mkdir(parents=True)
    (tmp_path / "clips" / "a" / "yes.wav").write_bytes(b"RIFF1")
    (tmp_path / "clips" / "no.wav").write_bytes(b"RIFF2")
    (tmp_path / "clips" / "unrelated.txt").write_text("not named")
    csv = tmp_path / "words.csv"
    csv.write_text("audio,label\na/yes.wav,yes\nno.wav,no\nno.wav,no\n")
    with zipfile.ZipFile(zip_folder(csv, tmp_path / "clips", tmp_path / "clips.zip")) as archive:
        assert sorted(archive.namelist()) == ["a/yes.wav", "no.wav"]
    csv.write_text("audio,label\na/yes.wav,yes\nmissing.wav,no\n")
    with pytest.raises(ApiError) as err:
        zip_folder(csv, tmp_path / "clips", tmp_path / "again.zip")
    assert (err.value.file, err.value.row, err.value.field) == ("words.csv", 3, "audio")
