"""The Keras trainer image, run through the DockerRunner: a fresh model, a retrained base model
(output layer adapted to new labels), and the refusal of unsafe base models."""

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

LIMITS = ResourceLimits(memory_bytes=4 * 2**30, cpus=2)


def keras_python(client, image: str, code: str, out_dir):
    """Run Python in the Keras image (no network, non-root) with out_dir mounted at /out."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.chown(out_dir, 1000, 1000)
    return client.containers.run(
        image, ["python", "-c", code], volumes={str(out_dir): {"bind": "/out", "mode": "rw"}},
        network_mode="none", user="1000:1000", remove=True, stderr=True,
    ).decode()


TOKEN = "0123456789abcdef0123456789abcdef"  # the runs' progress token, so the lines can be read back


def run_keras(runner, ws: Workspace, image: str):
    lines: list[str] = []
    result = runner.run(RunRequest(job_id=ws.root.name, workspace=ws, trainer="keras", image=image, limits=LIMITS,
                                   progress_token=TOKEN), lines.append, threading.Event())
    return result, lines


def progress(lines):
    """The progress records among the lines, read as the worker reads them."""
    parsed = [parse_trainer_line(line, TOKEN) for line in lines]
    return [p.data for p in parsed if p.type == EventType.progress]


@pytest.fixture(scope="module")
def fresh_model(keras_image, docker_client, tmp_path_factory):
    """One small training run from scratch: two tone classes."""
    from worker.runners.docker import DockerRunner

    ws = Workspace(tmp_path_factory.mktemp("keras") / "fresh")
    tone_dataset(ws.channel("train"), labels=("low", "high"), per_class=12)
    ws.prepare({"epochs": "8", "batch_size": "8", "learning_rate": "0.003"}, {"job_id": "fresh"})
    runner = DockerRunner(worker_id="test-keras", client=docker_client)
    result, lines = run_keras(runner, ws, keras_image)
    return ws, result, lines


@pytest.mark.timeout(1800)  # includes a cold image build
def test_fresh_keras_model_trains_in_the_image(fresh_model, keras_image, docker_client, tmp_path):
    ws, result, lines = fresh_model
    assert result.outcome is Outcome.succeeded, (result, lines[-20:])
    steps = progress(lines)
    assert [p["epoch"] for p in steps][:2] == [1, 2] and steps[-1]["epochs"] == 8
    assert {"train_loss", "val_loss", "val_accuracy"} <= set(steps[0]["metrics"])
    assert json.loads((ws.model_dir / "labels.json").read_text()) == ["high", "low"]
    metrics = json.loads((ws.output_data / "metrics.json").read_text())
    assert {"accuracy", "macro_f1", "macro_precision", "macro_recall", "confusion_matrix", "per_class"} <= set(metrics)
    assert metrics["accuracy"] >= 0.75, metrics["accuracy"]  # two tone bands an octave+ apart
    # Reported on a held-out test split, never on the clips that drove early stopping.
    assert metrics["eval_split"] == "test" and metrics["eval_size"] == metrics["test_size"] > 0
    assert sum(map(sum, metrics["confusion_matrix"]["matrix"])) == metrics["test_size"]
    for name in ("training_curves.png", "confusion_matrix.png"):
        assert (ws.model_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "test split" in (ws.model_dir / "model_card.md").read_text()

    # The artifact loads with plain Keras (safe mode) and takes raw audio.
    out = tmp_path / "check"
    out.mkdir()
    shutil.copy(ws.model_dir / "model.keras", out / "model.keras")
    printed = keras_python(docker_client, keras_image, (
        "import keras, numpy as np\n"
        "m = keras.saving.load_model('/out/model.keras', safe_mode=True)\n"
        "t = np.arange(16000) / 16000\n"
        "x = np.stack([0.4 * np.sin(2 * np.pi * 300 * t), 0.4 * np.sin(2 * np.pi * 660 * t)]).astype('float32')\n"
        "print('PRED', m.predict(x, verbose=0).argmax(1).tolist(), m.input_shape)\n"), out)
    pred_line = next(line for line in printed.splitlines() if line.startswith("PRED"))
    assert pred_line.startswith("PRED [1, 0]"), printed  # low, high in labels.json order


def test_retrain_base_model_with_new_labels(fresh_model, keras_image, docker_client, tmp_path):
    from worker.runners.docker import DockerRunner

    base_ws, base_result, _ = fresh_model
    assert base_result.outcome is Outcome.succeeded
    ws = Workspace(tmp_path / "retrain")
    tone_dataset(ws.channel("train"), labels=("low", "high", "mid"), per_class=8, seed=1)
    ws.channel("model").mkdir(parents=True)
    for name in ("model.keras", "labels.json"):
        shutil.copy(base_ws.model_dir / name, ws.channel("model") / name)
    ws.prepare({"epochs": "3", "batch_size": "8"}, {"job_id": "retrain"})
    result, lines = run_keras(DockerRunner(worker_id="test-keras", client=docker_client), ws, keras_image)
    assert result.outcome is Outcome.succeeded, (result, lines[-20:])
    assert any("output layer adapted: 2 -> 3 classes; kept the weights of 2 known label(s)" in line for line in lines), lines
    assert json.loads((ws.model_dir / "labels.json").read_text()) == ["high", "low", "mid"]
    assert json.loads((ws.output_data / "metrics.json").read_text())["base_model"] == "model.keras"


UNSAFE_MODELS = r"""
import keras
inp = keras.Input((16000,))
x = keras.layers.Lambda(lambda t: t * 2.0, name="times_two")(inp)
out = keras.layers.Dense(2, activation="softmax")(keras.layers.Reshape((16000,))(x))
keras.Model(inp, out).save("/out/lambda.keras")

@keras.saving.register_keras_serializable(package="acme")
class Gain(keras.layers.Layer):
    def call(self, x):
        return x * 3.0

inp = keras.Input((16000,))
out = keras.layers.Dense(2, activation="softmax")(Gain(name="gain")(inp))
keras.Model(inp, out).save("/out/custom.keras")
print("saved")
"""


@pytest.mark.parametrize("kind, expected", [("lambda", "Lambda layer(s) times_two"), ("custom", "custom object(s)")])
def test_unsafe_base_model_is_refused(keras_image, docker_client, runner, tmp_path, kind, expected):
    made = tmp_path / "made"
    keras_python(docker_client, keras_image, UNSAFE_MODELS, made)
    ws = Workspace(tmp_path / f"unsafe-{kind}")
    tone_dataset(ws.channel("train"), labels=("low", "high"), per_class=4)
    ws.channel("model").mkdir(parents=True)
    shutil.copy(made / f"{kind}.keras", ws.channel("model") / "model.keras")
    ws.prepare({"epochs": "1"}, {"job_id": kind})
    result, lines = run_keras(runner, ws, keras_image)
    assert result.outcome is Outcome.failed and result.exit_code == 2, (result, lines[-10:])
    assert expected in result.reason, result.reason
    assert not (ws.model_dir / "model.keras").exists()
