"""Hugging Face fine-tuning (trainer_images/audio/hf_audio), run as the process runner runs it:
`train` in local mode on a directory laid out as trainer_images/CONTRACT.md, in the trainer's
own environment, with a base model directory in the model channel.

The base is a TINY wav2vec2 built in code with random weights (hidden size 32, two layers, a
three-layer conv stack): no hub is reachable, and the point is the method, not the network. A
random-init model on CPU learns little, so what is asserted is what it honestly does, measured
before the thresholds were set: its loss falls, and on the five held-out voices (accents and
voice variants never in training; 4 words, chance 0.25) it is clearly above chance.

These tests run in the service environment (no torch): the artifact is loaded the way a user
would load it, with `transformers.pipeline("audio-classification", model=DIR)`, in a trainer-env
subprocess.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "trainer_images" / "audio" / "train"
TRAINER_PYTHON = Path(os.environ.get("RETRAIN_TRAINER_PYTHON", ROOT / ".venv-trainer" / "bin" / "python"))

# `make test` installs all of these (deploy/local/install.sh); a missing one is a failure, not a skip.
assert TRAINER_PYTHON.exists(), f"the trainer environment {TRAINER_PYTHON} is not installed: run deploy/local/install.sh"
assert shutil.which("espeak-ng") and shutil.which("sox"), "espeak-ng and sox are needed: run deploy/local/install.sh"


def _load_spoken_words():
    spec = importlib.util.spec_from_file_location("spoken_words", ROOT / "demo" / "spoken_words.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("spoken_words", module)
    spec.loader.exec_module(module)
    return module


sw = _load_spoken_words()
WORDS = sw.DEFAULT_WORDS[:4]

# A tiny wav2vec2 and its feature extractor, saved as a user would upload them (safetensors).
BUILD_TINY_WAV2VEC2 = textwrap.dedent("""
    import sys
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForSequenceClassification

    torch.manual_seed(0)
    config = Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(32, 32, 32), conv_stride=(5, 4, 4), conv_kernel=(10, 8, 8),  # 80x down: 200 frames/s
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer", do_stable_layer_norm=True, classifier_proj_size=32,
        mask_time_prob=0.0, layerdrop=0.0,
    )
    Wav2Vec2ForSequenceClassification(config).save_pretrained(sys.argv[1], safe_serialization=True)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(sys.argv[1])
""")

# Other architectures, tiny: an AST (log-mel patches, fixed 128 frames), a Whisper encoder
# (log-mel padded to 30 s by its own extractor) and a bare HuBERT encoder without any head (as
# pretrained checkpoints ship; waveforms without attention mask, as hubert-base was trained).
BUILD_OTHER = textwrap.dedent("""
    import sys
    import torch
    torch.manual_seed(0)
    kind, out = sys.argv[1], sys.argv[2]
    if kind == "ast":
        from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification
        config = ASTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           max_length=128, num_mel_bins=64, frequency_stride=16, time_stride=16)
        ASTForAudioClassification(config).save_pretrained(out, safe_serialization=True)
        ASTFeatureExtractor(num_mel_bins=64, max_length=128).save_pretrained(out)
    elif kind == "whisper":
        from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForAudioClassification
        config = WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                               decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80,
                               classifier_proj_size=32)
        WhisperForAudioClassification(config).save_pretrained(out, safe_serialization=True)
        WhisperFeatureExtractor(feature_size=80).save_pretrained(out)
    elif kind == "hubert":
        from transformers import HubertConfig, HubertModel, Wav2Vec2FeatureExtractor
        config = HubertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                              conv_dim=(32, 32, 32), conv_stride=(5, 4, 4), conv_kernel=(10, 8, 8),
                              num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
        HubertModel(config).save_pretrained(out, safe_serialization=True)
        Wav2Vec2FeatureExtractor(return_attention_mask=False, do_normalize=False).save_pretrained(out)
""")

# Settings measured on two CPU cores. The base's random conv stack is no pretrained feature
# encoder, so it trains too (freeze_feature_encoder=false); the default (frozen) is checked apart.
HPS = {"epochs": "8", "batch_size": "8", "learning_rate": "0.003", "seed": "0", "patience": "8",
       "freeze_feature_encoder": "false"}
CNN_METRIC_KEYS = {"accuracy", "macro_precision", "macro_recall", "macro_f1", "test_size", "train_size", "val_size",
                   "eval_size", "best_epoch", "epochs_run", "best_val_loss", "num_labels", "eval_split", "stop_reason",
                   "labels", "label_counts", "per_class", "confusion_matrix", "notes", "base_model", "training_seconds"}


class Workspace:
    """A local-mode job directory, and the SM_* variables the process runner would set for it."""

    def __init__(self, root: Path, train_src: Path, hps: dict, base_model: Path):
        self.root = root
        for d in ("input/config", "model", "output/data", "checkpoints"):
            (root / d).mkdir(parents=True, exist_ok=True)
        shutil.copytree(train_src, root / "input/data/train")
        shutil.copytree(base_model, root / "input/data/model")
        (root / "input/config/hyperparameters.json").write_text(json.dumps(hps))
        (root / "input/config/job.json").write_text(
            json.dumps({"job_id": root.name, "model_name": "hf-kws", "task": "audio_classification"}))
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
            "HF_HUB_OFFLINE": "1",  # belt and braces: the trainer passes local_files_only anyway
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

    def run(self, timeout: int = 600) -> subprocess.CompletedProcess:
        return subprocess.run([str(TRAINER_PYTHON), str(TRAIN)], env=self.env, cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout)


def progress_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def pipeline_predictions(model_dir: Path, data_dir: Path, rows: list[dict]) -> dict:
    """transformers.pipeline on the artifact, in the trainer env: its labels and top-1 predictions."""
    script = textwrap.dedent("""
        import json, sys
        from transformers import pipeline
        model_dir, data_dir, paths = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
        classify = pipeline("audio-classification", model=model_dir, device=-1)
        labels = [classify.model.config.id2label[i] for i in range(classify.model.config.num_labels)]
        predictions = [classify(f"{data_dir}/{p}", top_k=1)[0]["label"] for p in paths]
        print(json.dumps({"labels": labels, "predictions": predictions}))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([str(TRAINER_PYTHON), "-c", script, str(model_dir), str(data_dir),
                             json.dumps([r["audio"] for r in rows])], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def csv_rows(data_dir: Path, split: str | None) -> list[dict]:
    with (data_dir / "dataset.csv").open() as f:
        return [r for r in csv.DictReader(f) if split is None or r.get("split", "") == split]


@pytest.fixture(scope="module")
def spoken(tmp_path_factory) -> Path:
    """4 words x 8 training voices x 2 repeats (validation left to the trainer) + the 5 held-out voices as test."""
    out = tmp_path_factory.mktemp("spoken")
    sw.make_dataset(out, WORDS, sw.TRAIN_VOICES, repeats=2, seed=1)
    sw.make_dataset(out, WORDS, sw.HELDOUT_VOICES, repeats=1, seed=1, split="test", append=True)
    return out


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-wav2vec2") / "tiny"
    result = subprocess.run([str(TRAINER_PYTHON), "-c", BUILD_TINY_WAV2VEC2, str(out)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in out.iterdir()}
    return out


@pytest.fixture(scope="module")
def trained(spoken, tiny_base, tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("job") / "ws", spoken, HPS, tiny_base)
    started = time.monotonic()
    result = ws.run()
    assert result.returncode == 0, (f"trainer failed:\n{result.stderr[-4000:]}\n"
                                    f"failure: {ws.failure.read_text() if ws.failure.exists() else '-'}")
    print(f"fine-tuning took {time.monotonic() - started:.1f}s")
    return ws, result


def test_dispatcher_runs_the_hugging_face_method_with_progress_per_epoch(trained):
    ws, result = trained
    assert "feature encoder frozen" not in result.stderr  # freeze_feature_encoder=false was honoured
    lines = progress_lines(result.stdout)
    assert [p["epoch"] for p in lines] == list(range(1, len(lines) + 1)) and len(lines) == ws.metrics()["epochs_run"]
    for p in lines:
        assert p["epochs"] == 8 and p["step"] >= 1
        assert {"train_loss", "val_loss", "val_accuracy", "val_macro_f1"} <= set(p["metrics"])
    # Length buckets: clips of similar duration share a batch, so little of each batch is padding.
    assert all(p["metrics"]["padding_fraction"] < 0.15 for p in lines), [p["metrics"]["padding_fraction"] for p in lines]
    # It learns: the training and validation losses fall.
    assert lines[-1]["metrics"]["train_loss"] < 0.8 * lines[0]["metrics"]["train_loss"]
    assert min(p["metrics"]["val_loss"] for p in lines) < lines[0]["metrics"]["val_loss"]


def test_metrics_are_on_the_held_out_test_split_with_the_cnn_keys(trained, spoken):
    ws, _ = trained
    m = ws.metrics()
    assert CNN_METRIC_KEYS <= set(m), CNN_METRIC_KEYS - set(m)
    test_rows = csv_rows(spoken, "test")
    assert m["eval_split"] == "test" and m["test_size"] == m["eval_size"] == len(test_rows) == 20
    assert m["train_size"] + m["val_size"] == len(csv_rows(spoken, None)) - len(test_rows)
    assert m["labels"] == sorted(WORDS) and set(m["per_class"]) == set(WORDS)
    assert sum(map(sum, m["confusion_matrix"])) == m["test_size"]
    assert m["method"] == "hf-audio-classification" and m["base_model_type"] == "wav2vec2"


def test_artifact_is_a_safetensors_transformers_directory_with_card_and_plots(trained):
    ws, _ = trained
    files = {p.name for p in ws.model.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "labels.json", "model_card.md",
            "training_curves.png", "confusion_matrix.png"} <= files, files
    assert not any(f.endswith((".bin", ".pt", ".pkl", ".py")) for f in files)
    config = json.loads((ws.model / "config.json").read_text())
    assert [config["id2label"][str(i)] for i in range(4)] == sorted(WORDS)
    assert config["retrain_lineage"][-1]["model_name"] == "hf-kws"
    card = (ws.model / "model_card.md").read_text()
    m = ws.metrics()
    for needle in ("## Data", f"| **total** | {m['train_size']} | {m['val_size']} | {m['test_size']} |",
                   "## Lineage", "wav2vec2", "## Hyperparameters", "| learning_rate | 0.003 |", "macro_f1",
                   "pipeline('audio-classification'"):
        assert needle in card, needle
    assert (ws.root / "checkpoints" / "hf-audio-checkpoint.pt").is_file()


def test_pipeline_loads_the_artifact_with_the_job_labels_and_beats_chance_on_unheard_voices(trained, spoken):
    ws, _ = trained
    test_rows = csv_rows(spoken, "test")
    out = pipeline_predictions(ws.model, spoken, test_rows)
    assert out["labels"] == sorted(WORDS)
    correct = sum(p == r["label"] for p, r in zip(out["predictions"], test_rows))
    accuracy = correct / len(test_rows)
    print(f"held-out voices through transformers.pipeline: {correct}/{len(test_rows)} = {accuracy:.2f}")
    # The pipeline and the trainer's own evaluation see the same model: same accuracy.
    assert accuracy == pytest.approx(ws.metrics()["accuracy"])
    # Four words: chance is 0.25. Measured 0.75 with these settings; a tiny random-init model is
    # noisy, so the bar is "clearly above chance", not that figure.
    assert accuracy >= 0.45


def test_a_rerun_resumes_from_the_checkpoint_instead_of_training_again(trained):
    ws, _ = trained
    result = ws.run()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from checkpoint after epoch 8" in result.stderr
    assert progress_lines(result.stdout) == []  # no epoch was trained again


def test_a_job_stopped_mid_training_resumes_at_the_next_epoch(spoken, tiny_base, tmp_path):
    hps = {**HPS, "epochs": "4"}
    ws = Workspace(tmp_path / "ws", spoken, hps, tiny_base)
    proc = subprocess.Popen([str(TRAINER_PYTHON), str(TRAIN)], env=ws.env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("{") and json.loads(line)["epoch"] == 2:
                break
        proc.send_signal(signal.SIGTERM)  # what the runners do on cancel or deadline
        assert proc.wait(timeout=60) != 0
    finally:
        proc.kill()
    assert "SIGTERM" in ws.failure.read_text()
    result = ws.run()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from checkpoint after epoch 2" in result.stderr
    assert [p["epoch"] for p in progress_lines(result.stdout)] == [3, 4]


def test_defaults_freeze_the_feature_encoder_and_accumulate_gradients(spoken, tiny_base, tmp_path):
    hps = {"epochs": "1", "batch_size": "8", "gradient_accumulation_steps": "3", "learning_rate": "0.003"}
    ws = Workspace(tmp_path / "ws", spoken, hps, tiny_base)
    result = ws.run()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "feature encoder frozen" in result.stderr
    (line,) = progress_lines(result.stdout)
    # 56 training clips in batches of 8 = 7 forward passes; a step every 3 = 3 optimizer steps.
    assert ws.metrics()["train_size"] == 56 and line["step"] == 3


@pytest.mark.parametrize("kind", ["ast", "whisper", "hubert"])
def test_other_architectures_fine_tune_and_load_in_the_pipeline(kind, spoken, tmp_path):
    base = tmp_path / kind
    result = subprocess.run([str(TRAINER_PYTHON), "-c", BUILD_OTHER, kind, str(base)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ws = Workspace(tmp_path / "ws", spoken, {"epochs": "1", "batch_size": "8", "learning_rate": "0.001"}, base)
    result = ws.run()
    assert result.returncode == 0, result.stderr[-3000:]
    # The trainer itself checks the pipeline agrees with the trained model before succeeding.
    assert ws.metrics()["pipeline_max_abs_prob_diff"] < 1e-3
    assert ws.metrics()["base_model_type"] == {"ast": "audio-spectrogram-transformer"}.get(kind, kind)
    assert ("feature encoder frozen" in result.stderr) == (kind == "hubert")  # only HuBERT has a conv feature encoder
    assert json.loads((ws.model / "config.json").read_text())["id2label"] == {str(i): w for i, w in enumerate(sorted(WORDS))}


def _refused(tmp_path: Path, spoken: Path, base: Path) -> str:
    ws = Workspace(tmp_path / "ws", spoken, HPS, base)
    result = ws.run(timeout=300)
    assert result.returncode != 0
    assert ws.failure.is_file(), result.stderr[-2000:]
    assert not (ws.model / "model.safetensors").exists()
    return ws.failure.read_text()


def test_a_base_asking_for_custom_code_is_refused(spoken, tiny_base, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoModelForAudioClassification": "modeling_evil.EvilModel"}
    (base / "config.json").write_text(json.dumps(config))
    reason = _refused(tmp_path, spoken, base)
    assert "auto_map" in reason and "custom code" in reason


def test_a_base_with_python_files_is_refused(spoken, tiny_base, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    (base / "modeling_evil.py").write_text("import os\nos.system('touch /tmp/pwned')\n")
    reason = _refused(tmp_path, spoken, base)
    assert "modeling_evil.py" in reason and "Python code" in reason


def test_a_base_with_only_pickled_weights_is_refused(spoken, tiny_base, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    (base / "model.safetensors").unlink()
    # Not a real torch pickle: the trainer must refuse it by its name, without ever opening it.
    (base / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    reason = _refused(tmp_path, spoken, base)
    assert "pytorch_model.bin" in reason and "pickle" in reason and "safetensors" in reason


def test_a_learning_curve_comes_with_the_fine_tuning_too(spoken, tiny_base, tmp_path):
    """learning_curve=true: the same recipe from the same base on half the training split; the
    curve, its predictions and the plot are in metrics.json, the card and the model directory."""
    ws = Workspace(tmp_path / "ws", spoken, {**HPS, "epochs": "2", "learning_curve": "true",
                                               "learning_curve_fractions": "0.5", "target_metric": "0.99"}, tiny_base)
    result = ws.run()
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = ws.metrics()
    lc = metrics["learning_curve"]
    assert [p["fraction"] for p in lc["points"]] == [0.5, 1.0] and lc["metric"] == "macro_f1"
    assert lc["points"][-1]["metric"] == metrics["macro_f1"] and lc["points"][0]["train_size"] < metrics["train_size"]
    assert [p["factor"] for p in lc["predictions"]] == [2, 4] and all(0 <= p["metric"] <= 1 for p in lc["predictions"])
    assert "How much more data would help" in (ws.model / "model_card.md").read_text()
    assert (ws.model / "learning_curve.png").read_bytes().startswith(b"\x89PNG")
