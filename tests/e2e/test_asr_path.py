"""Speech recognition through the whole service: a client uploads transcribed clips (one of them a
video) over HTTP, the `asr` job goes through Kafka to a worker and the trainer, the model version
lands in MinIO; then a `transcribe` job names that stored version as its base and returns a CSV of
transcripts and a PDF report as the job's outputs. The downloaded artifact is loaded with
`transformers.pipeline` (in the trainer's environment: the test environment has no torch).

Models are small and train for two epochs: the point is the path, not the word error rate (see
tests/trainer/test_speech.py and the model card for what the figures mean).
"""

import csv
import io
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from demo.spoken_digits import HELDOUT_VOICES, TRAIN_VOICES, make_digit_dataset, zip_clips
from tests.conftest import extract_artifact, submit, wait_for

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
TRAINER_PYTHON = Path(os.environ.get("RETRAIN_TRAINER_PYTHON", ROOT / ".venv-trainer" / "bin" / "python"))
MODEL_NAME = "digits-e2e"
SPEC = {
    "task": "asr", "model_name": MODEL_NAME,
    # A small conformer trained from scratch for two epochs: a couple of minutes on 2 CPU cores. At
    # that budget it transcribes nothing yet (blank collapse), which would fail the job: this path
    # test asks for the model anyway, and checks the warning says so.
    "hyperparameters": {"epochs": 2, "batch_size": 4, "learning_rate": 0.002, "seed": 0, "conv_kernel": 7,
                        "hidden_size": 96, "num_hidden_layers": 2, "intermediate_size": 192,
                        "on_blank_collapse": "warn"},
}


def to_video(wav: Path, dest: Path) -> Path:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", "color=black:s=64x64:r=10",
                    "-i", str(wav), "-shortest", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", str(dest)],
                   check=True, capture_output=True)
    return dest


@pytest.fixture(scope="module")
def digit_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("digits")
    data = root / "data"
    make_digit_dataset(data, TRAIN_VOICES, 4, seed=3)
    csv_path = make_digit_dataset(data, HELDOUT_VOICES, 2, seed=3, split="test", append=True)
    rows = list(csv.DictReader(csv_path.open()))
    wav = data / rows[0]["audio"]
    rows[0]["audio"] = to_video(wav, wav.with_suffix(".mp4")).relative_to(data).as_posix()
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["audio", "text", "split"])
        writer.writeheader()
        writer.writerows(rows)

    # The files to transcribe: held-out clips and a video.
    files = root / "transcribe"
    files.mkdir()
    heldout = [r["audio"] for r in rows if r["split"] == "test"][:3]
    for rel in heldout:
        shutil.copy(data / rel, files / Path(rel).name)
    to_video(data / heldout[0], files / "talk.mp4")
    names = [Path(rel).name for rel in heldout] + ["talk.mp4"]
    (files / "dataset.csv").write_text("audio\n" + "\n".join(names) + "\n")
    return {
        "csv": csv_path, "zip": zip_clips(data, csv_path, root / "clips.zip"), "rows": rows,
        "transcribe_csv": files / "dataset.csv", "transcribe_zip": zip_clips(files, files / "dataset.csv", root / "files.zip"),
        "names": names,
    }


@pytest.fixture(scope="module")
def asr_job(api, digit_data):
    response = submit(api, SPEC, digit_data["csv"], digit_data["zip"])
    assert response.status_code == 202, response.text
    return wait_for(api, response.json()["id"], timeout=480)


@pytest.fixture(scope="module")
def transcribe_job(api, asr_job, digit_data):
    assert asr_job["state"] == "succeeded", asr_job["error"]
    spec = {"task": "transcribe", "model_name": MODEL_NAME, "base": {"model": MODEL_NAME, "version": "latest"}}
    response = submit(api, spec, digit_data["transcribe_csv"], digit_data["transcribe_zip"])
    assert response.status_code == 202, response.text
    return wait_for(api, response.json()["id"], timeout=300)


def test_asr_job_makes_a_model_version_with_wer_and_cer(api, asr_job, digit_data):
    assert asr_job["state"] == "succeeded", asr_job["error"]
    assert asr_job["model_name"] == MODEL_NAME and asr_job["model_version"] >= 1
    metrics = asr_job["metrics"]
    assert {"wer", "cer", "test_size"} <= set(metrics), metrics
    assert metrics["test_size"] == sum(r["split"] == "test" for r in digit_data["rows"])
    assert metrics["wer"] >= 0 and metrics["cer"] >= 0
    if metrics["empty_transcriptions"] >= 0.9:  # a collapsed model is never a silent success
        stored = api.get(f"/v1/models/{MODEL_NAME}/versions/{asr_job['model_version']}/files/metrics.json").json()
        assert any("collapsed to blanks" in w for w in stored["warnings"]), stored["warnings"]
    assert asr_job["progress"]["epoch"] == SPEC["hyperparameters"]["epochs"]
    print(f"e2e asr: test WER {metrics['wer']:.3f}, CER {metrics['cer']:.3f} on {metrics['test_size']} held-out clips")


def test_downloaded_artifact_loads_with_the_asr_pipeline(api, asr_job, digit_data, tmp_path):
    response = api.get(f"/v1/jobs/{asr_job['id']}/artifact")
    assert response.status_code == 200
    model_dir = extract_artifact(response.content, tmp_path / "model")
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "vocab.json").is_file()
    clip = digit_data["csv"].parent / next(r["audio"] for r in digit_data["rows"] if r["split"] == "test")
    code = f"""
        from transformers import pipeline
        asr = pipeline("automatic-speech-recognition", model={str(model_dir)!r}, device="cpu")
        print(repr(asr({str(clip)!r})["text"]))
    """
    result = subprocess.run([str(TRAINER_PYTHON), "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert isinstance(eval(result.stdout.strip().splitlines()[-1]), str)  # noqa: S307 - our own repr


def test_transcribe_job_returns_transcripts_and_a_pdf(api, transcribe_job, asr_job, digit_data):
    assert transcribe_job["state"] == "succeeded", transcribe_job["error"]
    assert {"transcripts.csv", "report.pdf"} <= set(transcribe_job["outputs"])
    assert not transcribe_job.get("model_version"), "a transcription makes no model version"

    csv_response = api.get(f"/v1/jobs/{transcribe_job['id']}/outputs/transcripts.csv")
    assert csv_response.status_code == 200
    rows = list(csv.DictReader(io.StringIO(csv_response.text)))
    assert [r["audio"] for r in rows] == digit_data["names"]
    assert all(float(r["seconds"]) > 0.5 for r in rows)  # the video's audio track was decoded too

    pdf = api.get(f"/v1/jobs/{transcribe_job['id']}/outputs/report.pdf")
    assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF")

    # The stored version it used is still the only one: transcription did not publish a model.
    versions = api.get(f"/v1/models/{MODEL_NAME}/versions").json()
    assert [v["version"] for v in versions] == [asr_job["model_version"]]


def test_model_version_keeps_card_and_curves(api, asr_job):
    versions = api.get(f"/v1/models/{MODEL_NAME}/versions").json()
    version = next(v for v in versions if v["version"] == asr_job["model_version"])
    assert "metrics.json" in version["files"] and any(f.endswith(".png") for f in version["files"])
    metrics = api.get(f"/v1/models/{MODEL_NAME}/versions/latest/files/metrics.json").json()
    assert metrics["wer"] == asr_job["metrics"]["wer"] and metrics["eval_split"] == "test"
    assert metrics["examples"] and {"reference", "prediction"} <= set(metrics["examples"][0])
    # WER and CER on validation after every epoch (the progress lines carried the same figures).
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert all({"val_wer", "val_cer", "val_loss", "train_loss"} <= set(h) for h in metrics["history"])

