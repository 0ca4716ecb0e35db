"""The PyTorch audio trainer image, run through the DockerRunner on a tiny spoken-word data set."""

from __future__ import annotations

import json
import shutil
import threading

import pytest

from tests.docker.conftest import tone_dataset
from jobs.events import EventType
from worker.events import parse_trainer_line
from worker.runners.base import Outcome, ResourceLimits, RunRequest
from worker.workspace import Workspace

pytestmark = pytest.mark.docker


def make_train_channel(path):
    """espeak-ng speech through demo/spoken_words.py when it can run here; tones otherwise."""
    try:
        from demo.spoken_words import TRAIN_VOICES, make_dataset

        if shutil.which("espeak-ng") and shutil.which("sox"):
            return make_dataset(path, words=["yes", "no"], voices=TRAIN_VOICES[:4], repeats=3), ["no", "yes"]
    except ImportError:
        pass
    tone_dataset(path, labels=("high", "low"), per_class=12)
    return path / "dataset.csv", ["high", "low"]


@pytest.mark.timeout(3600)  # a cold image build (wheels + torch layer) is part of the first use
def test_audio_trainer_image_trains_a_tiny_model(audio_image, runner, tmp_path):
    ws = Workspace(tmp_path / "audio-job")
    _, labels = make_train_channel(ws.channel("train"))
    ws.prepare({"epochs": "3", "batch_size": "8"}, {"job_id": "audio-job", "task": "audio_classification"})
    lines: list[str] = []
    request = RunRequest(job_id="audio-job", workspace=ws, trainer="audio", image=audio_image,
                         limits=ResourceLimits(memory_bytes=6 * 2**30, cpus=2), deadline_s=900)
    result = runner.run(request, lines.append, threading.Event())
    assert result.outcome is Outcome.succeeded, (result, lines[-30:])
    parsed = [parse_trainer_line(line, request.progress_token) for line in lines]
    progress = [p.data for p in parsed if p.type == EventType.progress]
    assert progress and progress[0]["epoch"] == 1 and "metrics" in progress[0], lines[-30:]
    assert json.loads((ws.model_dir / "labels.json").read_text()) == labels
    assert (ws.model_dir / "model.onnx").exists(), sorted(p.name for p in ws.model_dir.iterdir())
    metrics = json.loads((ws.output_data / "metrics.json").read_text())
    assert "accuracy" in json.dumps(metrics)
