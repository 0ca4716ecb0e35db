"""The `retrain` command, as a user runs it, against the real service (API, Kafka, worker,
trainer, MinIO): submit a folder of clips and follow the job live, download the model, promote
it; a refusal is one line naming the file and row; watch and cancel."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

RETRAIN = Path(sys.executable).parent / "retrain"  # the entry point `make install` puts in .venv


def retrain(service, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "RETRAIN_API_URL": service.api_url, "RETRAIN_API_KEY": service.admin_key(), "RETRAIN_CONFIG": os.devnull}
    return subprocess.run([str(RETRAIN), *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_submit_a_folder_follow_it_download_and_promote(service, keyword_data, tmp_path):
    csv = keyword_data["csv"]
    done = retrain(service, "submit", str(csv), "--audio", str(csv.parent), "--task", "audio_classification",
                   "--model-name", "cli-e2e", "--hp", "epochs=3", "--hp", "batch_size=16", "--hp", "seed=0", "--wait")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    job_id = lines[0]
    assert re.fullmatch(r"[0-9a-f-]{36}", job_id), lines
    assert any(line.startswith("started on ") for line in lines), lines
    assert any(line.startswith("epoch 1/3") for line in lines), lines  # live progress, with metrics
    final = next(line for line in lines if line.startswith("succeeded: "))
    version = int(final.rsplit(" ", 1)[1])
    assert any(line.startswith("metrics: accuracy=") for line in lines), lines

    model = tmp_path / "model"
    got = retrain(service, "download", job_id, "-o", str(model))
    assert got.returncode == 0, got.stderr
    assert (model / "model.onnx").is_file() and (model / "labels.json").is_file()

    listed = retrain(service, "versions", "cli-e2e")
    assert listed.returncode == 0 and re.search(rf"^{version}\s+\S+\s+{job_id}", listed.stdout, re.M), listed.stdout
    promoted = retrain(service, "promote", "cli-e2e", str(version), "--alias", "production")
    assert promoted.returncode == 0 and promoted.stdout.strip() == f"cli-e2e: production -> {version}", promoted
    models = retrain(service, "models")
    assert re.search(rf"^cli-e2e\s+\d+\s+.*production={version}", models.stdout, re.M), models.stdout
    jobs = retrain(service, "jobs", "--state", "succeeded")
    assert job_id in jobs.stdout


def test_a_refusal_is_one_line_naming_the_file_and_row(service, keyword_data, tmp_path):
    csv = tmp_path / "words.csv"
    header, first, *rest = keyword_data["csv"].read_text().splitlines()
    other = next(row for row in rest if row.split(",")[1] != first.split(",")[1])  # two classes, or that is the refusal
    csv.write_text("\n".join([header, first, "missing.wav," + other.split(",", 1)[1]]) + "\n")
    refused = retrain(service, "submit", str(csv), "--audio", str(keyword_data["zip"]), "--task", "audio_classification",
                      "--model-name", "cli-refused")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.strip() == f"retrain: words.csv, row 3, field dataset: 'missing.wav' is not in the audio archive '{keyword_data['zip'].name}'"


def test_without_a_key_the_command_says_so_in_one_line(service, tmp_path):
    env = {**os.environ, "RETRAIN_API_URL": service.api_url, "RETRAIN_CONFIG": os.devnull}
    env.pop("RETRAIN_API_KEY", None)
    refused = subprocess.run([str(RETRAIN), "jobs"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert refused.returncode == 2
    assert refused.stderr.strip() == "retrain: field Authorization: an API key is needed: send Authorization: Bearer <key>"


def test_watch_a_job_that_is_cancelled(service, keyword_data):
    csv = keyword_data["csv"]
    submitted = retrain(service, "submit", str(csv), "--audio", str(keyword_data["zip"]), "--task", "audio_classification",
                        "--model-name", "cli-cancel", "--hp", "epochs=200", "--hp", "patience=200")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    cancelled = retrain(service, "cancel", job_id)
    assert cancelled.returncode == 0 and cancelled.stdout.strip() == "cancelled", cancelled
    watched = retrain(service, "watch", job_id)
    assert watched.returncode == 1
    assert watched.stdout.splitlines()[-1].startswith("cancelled") and "cancelled" in watched.stderr
