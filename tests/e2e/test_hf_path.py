"""Hugging Face fine-tuning through the whole service: a client uploads a tiny wav2vec2 (built in
code, saved with safetensors, zipped as a folder) with a CSV of spoken words; the job goes
API -> Kafka -> worker -> process runner -> `train` (dispatched to hf_audio because the model
channel holds a Hugging Face directory) -> MinIO; the client downloads model.tar.gz and uses it
with transformers.pipeline alone. A second job then retrains the stored version by name, without
re-uploading it, which is the service's retraining loop for Hugging Face models."""

import csv
import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from tests.conftest import WORDS, extract_artifact, submit, wait_for
from tests.trainer.test_hf_audio import BUILD_TINY_WAV2VEC2, TRAINER_PYTHON, pipeline_predictions

pytestmark = pytest.mark.e2e

NAME = "keywords-hf-e2e"
# Measured on two CPU cores: ~30 s of training. The random conv stack trains too (it is no
# pretrained feature encoder); JSON numbers and booleans arrive at the trainer as strings.
SPEC = {"task": "audio_classification", "model_name": NAME,
        "hyperparameters": {"epochs": 8, "batch_size": 8, "learning_rate": 0.003, "seed": 0, "patience": 8,
                            "freeze_feature_encoder": False}}


@pytest.fixture(scope="module")
def tiny_zip(tmp_path_factory) -> Path:
    """The upload: a zip holding one folder with config.json, model.safetensors, preprocessor_config.json."""
    root = tmp_path_factory.mktemp("hf-base")
    result = subprocess.run([str(TRAINER_PYTHON), "-c", BUILD_TINY_WAV2VEC2, str(root / "tiny-wav2vec2")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    archive = root / "tiny-wav2vec2.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted((root / "tiny-wav2vec2").iterdir()):
            zf.write(f, arcname=f"tiny-wav2vec2/{f.name}")
    return archive


@pytest.fixture(scope="module")
def trained(api, keyword_data, tiny_zip):
    response = submit(api, SPEC, keyword_data["csv"], keyword_data["zip"], model=tiny_zip)
    assert response.status_code == 202, response.text
    return wait_for(api, response.json()["id"])


def test_job_succeeds_with_metrics_on_a_held_out_split(trained):
    assert trained["state"] == "succeeded", trained["error"]
    metrics = trained["metrics"]
    for name in ("accuracy", "macro_precision", "macro_recall", "macro_f1", "test_size"):
        assert name in metrics, metrics
    # No split column: the trainer carved a stratified test split (4 words x round(0.15 x 16) = 2 clips).
    assert metrics["test_size"] == 8
    assert trained["progress"]["epoch"] >= 1


def test_downloaded_artifact_loads_with_transformers_pipeline_and_knows_the_words(api, trained, keyword_data, tmp_path):
    response = api.get(f"/v1/jobs/{trained['id']}/artifact")
    assert response.status_code == 200
    model_dir = extract_artifact(response.content, tmp_path / "model")
    files = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "labels.json", "model_card.md"} <= files

    rows = list(csv.DictReader(keyword_data["heldout_csv"].open()))
    out = pipeline_predictions(model_dir, keyword_data["heldout_dir"], rows)
    assert out["labels"] == sorted(WORDS)
    correct = sum(p == r["label"] for p, r in zip(out["predictions"], rows))
    print(f"held-out voices through transformers.pipeline: {correct}/{len(rows)} = {correct / len(rows):.2f}")
    assert set(out["predictions"]) <= set(WORDS)
    # Four words, chance 0.25; a tiny random-init model trained for seconds: clearly above chance.
    assert correct / len(rows) >= 0.4


def test_stored_version_is_retrained_by_name_and_its_lineage_grows(api, trained, keyword_data, tmp_path):
    assert trained["state"] == "succeeded", trained["error"]
    spec = {"task": "audio_classification", "model_name": NAME, "base": {"model": NAME, "version": trained["model_version"]},
            "hyperparameters": {"epochs": 1, "batch_size": 8, "learning_rate": 0.001}}
    response = submit(api, spec, keyword_data["csv"], keyword_data["zip"])
    assert response.status_code == 202, response.text
    job = wait_for(api, response.json()["id"])
    assert job["state"] == "succeeded", job["error"]
    assert job["model_version"] == trained["model_version"] + 1
    model_dir = extract_artifact(api.get(f"/v1/jobs/{job['id']}/artifact").content, tmp_path / "model")
    lineage = json.loads((model_dir / "config.json").read_text())["retrain_lineage"]
    assert [step.get("job_id") for step in lineage[-2:]] == [trained["id"], job["id"]]
    assert "Hugging Face `wav2vec2`" in (model_dir / "model_card.md").read_text()
