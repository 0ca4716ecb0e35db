"""The built-in audio trainer, run as the process runner runs it: `train` in local mode on a
directory laid out as trainer_images/CONTRACT.md, in the trainer's own environment.

These tests run in the service environment (no torch): they only use the trainer's outputs, the
way a user would: model.onnx through onnxruntime, labels.json, metrics.json, the failure file.
The data are spoken words from demo/spoken_words.py; the held-out voices (accents and voice
variants never in training) are the test split, so the accuracy checked here is on unheard voices.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "trainer_images" / "audio" / "train"
TRAINER_PYTHON = Path(os.environ.get("RETRAIN_TRAINER_PYTHON", ROOT / ".venv-trainer" / "bin" / "python"))

# `make test` installs all of these (deploy/local/install.sh); a missing one is a failure, not a skip.
assert TRAINER_PYTHON.exists(), f"the trainer environment {TRAINER_PYTHON} is not installed: run deploy/local/install.sh"
assert shutil.which("espeak-ng") and shutil.which("sox"), "espeak-ng and sox are needed: run deploy/local/install.sh"

import onnxruntime as ort  # noqa: E402


def _load_spoken_words():
    spec = importlib.util.spec_from_file_location("spoken_words", ROOT / "demo" / "spoken_words.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("spoken_words", module)
    spec.loader.exec_module(module)
    return module


sw = _load_spoken_words()

# Fast settings that still learn the task on two CPU cores.
HPS = {"epochs": "15", "batch_size": "16", "learning_rate": "0.003", "seed": "0", "patience": "6"}
METRIC_KEYS = {"accuracy", "macro_precision", "macro_recall", "macro_f1", "test_size", "train_size", "val_size",
               "best_epoch", "epochs_run", "labels", "per_class", "confusion_matrix", "eval_split"}


class Workspace:
    """A local-mode job directory, and the SM_* variables the process runner would set for it."""

    def __init__(self, root: Path, train_src: Path, hps: dict, base_model: Path | None = None):
        self.root = root
        for d in ("input/config", "model", "output/data", "checkpoints"):
            (root / d).mkdir(parents=True, exist_ok=True)
        shutil.copytree(train_src, root / "input/data/train")
        if base_model is not None:
            shutil.copytree(base_model, root / "input/data/model")
        (root / "input/config/hyperparameters.json").write_text(json.dumps(hps))
        (root / "input/config/job.json").write_text(json.dumps({"job_id": root.name, "model_name": "kws", "task": "audio_classification"}))
        channels = sorted(p.name for p in (root / "input/data").iterdir())
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SM_")}
        self.env.update({
            "SM_MODEL_DIR": str(root / "model"),
            "SM_INPUT_DIR": str(root / "input"),
            "SM_INPUT_CONFIG_DIR": str(root / "input/config"),
            "SM_OUTPUT_DIR": str(root / "output"),
            "SM_OUTPUT_DATA_DIR": str(root / "output/data"),
            "SM_CHECKPOINT_DIR": str(root / "checkpoints"),
            "SM_CHANNELS": json.dumps(channels),
            "SM_HPS": json.dumps(hps),
            "SM_NUM_GPUS": "0",
            "SM_NUM_CPUS": str(os.cpu_count() or 1),
            "SM_CURRENT_HOST": "algo-1",
            "SM_HOSTS": '["algo-1"]',
            "PYTHONUNBUFFERED": "1",
        })
        for name in channels:
            self.env[f"SM_CHANNEL_{name.upper()}"] = str(root / "input/data" / name)

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def failure(self) -> Path:
        return self.root / "output" / "failure"

    def metrics(self) -> dict:
        return json.loads((self.root / "output/data/metrics.json").read_text())

    def cmd(self) -> list[str]:
        return [str(TRAINER_PYTHON), str(TRAIN)]

    def run(self, timeout: int = 600) -> subprocess.CompletedProcess:
        return subprocess.run(self.cmd(), env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def progress_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def onnx_predict(model_dir: Path, clips: list[np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    return np.array([int(np.argmax(session.run(["logits"], {"waveform": c[None, :]})[0][0])) for c in clips])


def read_clips(data_dir: Path, split: str | None = None) -> tuple[list[np.ndarray], list[str]]:
    import csv

    with (data_dir / "dataset.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if split is None or r.get("split") == split]
    return [sf.read(data_dir / r["audio"], dtype="float32")[0] for r in rows], [r["label"] for r in rows]


@pytest.fixture(scope="module")
def spoken(tmp_path_factory) -> Path:
    """8 words x 8 training voices x 2 repeats (split left to the trainer) + 5 held-out voices as test."""
    out = tmp_path_factory.mktemp("spoken")
    sw.make_dataset(out, sw.DEFAULT_WORDS, sw.TRAIN_VOICES, repeats=2, seed=1)
    sw.make_dataset(out, sw.DEFAULT_WORDS, sw.HELDOUT_VOICES, repeats=1, seed=1, split="test", append=True)
    return out


@pytest.fixture(scope="module")
def trained(spoken, tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("job") / "ws", spoken, HPS)
    started = time.monotonic()
    result = ws.run()
    assert result.returncode == 0, f"trainer failed:\n{result.stderr[-4000:]}\nfailure: {ws.failure.read_text() if ws.failure.exists() else '-'}"
    print(f"training took {time.monotonic() - started:.1f}s")
    return ws, result


def test_dataset_generator_writes_16k_mono_wavs_and_split_column(spoken):
    header, *rows = (spoken / "dataset.csv").read_text().splitlines()
    assert header == "audio,label,split"
    assert len(rows) == 8 * 8 * 2 + 8 * 5
    assert sum(r.endswith(",test") for r in rows) == 8 * 5
    info = sf.info(spoken / rows[0].split(",")[0])
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    train_accents = {v.name.split("+")[0] for v in sw.TRAIN_VOICES}
    assert not train_accents & {v.name.split("+")[0] for v in sw.HELDOUT_VOICES}


def test_zip_clips_uses_csv_paths(spoken, tmp_path):
    import zipfile

    z = sw.zip_clips(spoken, spoken / "dataset.csv", tmp_path / "clips.zip")
    names = set(zipfile.ZipFile(z).namelist())
    assert names == {line.split(",")[0] for line in (spoken / "dataset.csv").read_text().splitlines()[1:]}


def test_model_dir_holds_the_artifacts(trained):
    ws, _ = trained
    names = {p.name for p in ws.model.iterdir()}
    assert {"model.onnx", "labels.json", "model.safetensors", "config.json", "model_card.md",
            "training_curves.png", "confusion_matrix.png"} <= names
    assert {"metrics.json", "training_curves.png", "confusion_matrix.png"} <= {p.name for p in (ws.root / "output/data").iterdir()}
    config = json.loads((ws.model / "config.json").read_text())
    assert config["format"] == "retrain-audio-cnn" and config["labels"] == json.loads((ws.model / "labels.json").read_text())
    card = (ws.model / "model_card.md").read_text()
    assert "macro_f1" in card and "Hyperparameters" in card and "test" in card
    assert not ws.failure.exists()


def test_progress_lines_are_json(trained):
    _, result = trained
    lines = progress_lines(result.stdout)
    assert lines, result.stdout
    assert [p["epoch"] for p in lines] == list(range(1, len(lines) + 1))
    for p in lines:
        assert p["epochs"] == 15 and p["step"] > 0
        assert {"train_loss", "val_loss", "val_accuracy", "val_macro_f1"} <= set(p["metrics"])
    # anything else on stdout is not JSON; the trainer logs to stderr
    assert all(line.startswith("{") for line in result.stdout.splitlines() if line.strip())


def test_metrics_are_on_the_heldout_test_split_and_consistent(trained):
    ws, result = trained
    m = ws.metrics()
    assert METRIC_KEYS <= set(m)
    labels = json.loads((ws.model / "labels.json").read_text())
    assert m["labels"] == labels == sorted(sw.DEFAULT_WORDS)
    assert m["eval_split"] == "test" and m["test_size"] == 8 * 5
    assert m["train_size"] + m["val_size"] == 8 * 8 * 2
    cm = np.array(m["confusion_matrix"])
    assert cm.shape == (8, 8) and cm.sum() == m["test_size"]
    assert m["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    for i, label in enumerate(labels):
        assert m["per_class"][label]["support"] == cm[i].sum() == 5
    assert 1 <= m["best_epoch"] <= m["epochs_run"] <= 15
    assert len(progress_lines(result.stdout)) == m["epochs_run"]


def test_onnx_alone_recognises_unheard_voices(trained, spoken):
    ws, _ = trained
    labels = json.loads((ws.model / "labels.json").read_text())
    clips, truth = read_clips(spoken, split="test")
    predicted = onnx_predict(ws.model, clips)
    accuracy = float(np.mean([labels[p] == t for p, t in zip(predicted, truth)]))
    print(f"held-out-voice accuracy (onnxruntime): {accuracy:.3f}")
    assert accuracy >= 0.6, accuracy  # chance is 0.125
    assert accuracy == pytest.approx(ws.metrics()["accuracy"], abs=0.1)

    # dynamic batch and length: a zero-padded batch gives the same answers as one-by-one
    session = ort.InferenceSession(str(ws.model / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = clips[:6]
    x = np.zeros((len(batch), max(len(c) for c in batch)), dtype=np.float32)
    for i, c in enumerate(batch):
        x[i, : len(c)] = c
    (logits,) = session.run(["logits"], {"waveform": x})
    assert logits.shape == (6, len(labels))
    assert np.mean(logits.argmax(1) == predicted[:6]) >= 5 / 6
    assert session.get_inputs()[0].name == "waveform" and session.get_outputs()[0].name == "logits"


def test_continue_from_base_with_an_extra_class_and_resume_after_kill(trained, tmp_path):
    base_ws, _ = trained
    words = [*sw.DEFAULT_WORDS, "off"]
    data = tmp_path / "data"
    sw.make_dataset(data, words, sw.TRAIN_VOICES, repeats=1, seed=2)
    hps = {"epochs": "6", "batch_size": "16", "learning_rate": "0.002", "seed": "0", "patience": "6"}
    ws = Workspace(tmp_path / "ws", data, hps, base_model=base_ws.model)

    # Kill the first attempt after its first epoch; the rerun must resume from the checkpoint.
    proc = subprocess.Popen(ws.cmd(), env=ws.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    first = proc.stdout.readline()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    assert json.loads(first)["epoch"] == 1

    result = ws.run()
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resumed from checkpoint after epoch" in result.stderr
    epochs = [p["epoch"] for p in progress_lines(result.stdout)]
    assert epochs and epochs[0] >= 2 and epochs[-1] <= 6

    base_labels = json.loads((base_ws.model / "labels.json").read_text())
    labels = json.loads((ws.model / "labels.json").read_text())
    assert labels == base_labels + ["off"]  # the base's logit order is kept, the new class appended
    m = ws.metrics()
    assert m["labels"] == labels and np.array(m["confusion_matrix"]).shape == (9, 9)
    assert m["base_model"] is True and m["eval_split"] == "test"
    config = json.loads((ws.model / "config.json").read_text())
    assert len(config["lineage"]) == 2
    session = ort.InferenceSession(str(ws.model / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(["logits"], {"waveform": np.zeros((2, 12000), np.float32)})[0].shape == (2, 9)


def test_missing_audio_file_fails_with_a_reason(spoken, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(spoken, data)
    with (data / "dataset.csv").open("a") as f:
        f.write("clips/nowhere/ghost.wav,yes,\n")
    ws = Workspace(tmp_path / "ws", data, HPS)
    result = ws.run()
    assert result.returncode != 0
    reason = ws.failure.read_text()
    assert "clips/nowhere/ghost.wav" in reason and "does not exist" in reason
    assert not (ws.model / "model.onnx").exists()


def test_undecodable_file_and_too_few_examples_fail_with_reasons(spoken, tmp_path):
    data = tmp_path / "bad"
    data.mkdir()
    (data / "noise.wav").write_bytes(b"this is not audio")
    shutil.copytree(spoken / "clips", data / "clips")
    rows = (spoken / "dataset.csv").read_text().splitlines()
    (data / "dataset.csv").write_text("\n".join(rows + ["noise.wav,yes,"]) + "\n")
    ws = Workspace(tmp_path / "ws1", data, HPS)
    assert ws.run().returncode != 0
    assert "noise.wav" in ws.failure.read_text() and "decode" in ws.failure.read_text()

    # a label with two recordings cannot be split three ways
    few = tmp_path / "few"
    shutil.copytree(spoken / "clips", few / "clips")
    plain = [r.rsplit(",", 1)[0] for r in rows[1:] if not r.endswith(",test")]
    rare = [r for r in plain if r.endswith(",go")][:2]
    kept = [r for r in plain if not r.endswith(",go")] + rare
    (few / "dataset.csv").write_text("audio,label\n" + "\n".join(kept) + "\n")
    ws = Workspace(tmp_path / "ws2", few, HPS)
    assert ws.run().returncode != 0
    assert "'go'" in ws.failure.read_text()


def test_foreign_base_model_is_refused(spoken, tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    # Hugging Face directories go to hf_audio (the dispatcher); a config of some other tool stays
    # here and is refused with a reason rather than half-loaded.
    (hf / "config.json").write_text(json.dumps({"format": "someone-elses-cnn", "layers": 4}))
    (hf / "model.safetensors").write_bytes(b"\0" * 16)
    ws = Workspace(tmp_path / "ws", spoken, HPS, base_model=hf)
    assert ws.run().returncode != 0
    assert "an unknown model" in ws.failure.read_text()
