"""Speech recognition in the audio image (tasks `asr` and `transcribe`), run as the process runner
runs it: `train` in local mode on a directory laid out as trainer_images/CONTRACT.md, in the
trainer's own environment.

The test environment has no torch: everything that needs transformers (building a tiny base
model, loading the artifact with `transformers.pipeline`) runs as a subprocess of the trainer env,
the way a user's own code would load the model. Data: digit strings spoken by espeak-ng
(demo/spoken_digits.py); the held-out voices (accents never in training) are the test split.

A fresh CTC model trained for a minute on a CPU does not transcribe yet; what is asserted is what
is honest at that budget: the metrics are computed on the stated held-out split, training moves
the validation error below the untrained model's, and every artifact and report is usable.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from demo.spoken_digits import DIGITS, HELDOUT_VOICES, TRAIN_VOICES, make_digit_dataset

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "trainer_images" / "audio" / "train"
TRAINER_PYTHON = Path(os.environ.get("RETRAIN_TRAINER_PYTHON", ROOT / ".venv-trainer" / "bin" / "python"))

assert TRAINER_PYTHON.exists(), f"the trainer environment {TRAINER_PYTHON} is not installed: run deploy/local/install.sh"
for tool in ("espeak-ng", "sox", "ffmpeg"):
    assert shutil.which(tool), f"{tool} is needed: run deploy/local/install.sh"

# A small conformer that a contended 2-core CPU trains for a few epochs in about a minute.
SMALL = {"hidden_size": "96", "num_hidden_layers": "2", "intermediate_size": "192", "conv_kernel": "7"}
# At this budget the model may still emit only blanks: it is stored with a warning (the default fails).
HPS = {**SMALL, "epochs": "4", "batch_size": "4", "learning_rate": "0.002", "seed": "0", "patience": "4",
       "on_blank_collapse": "warn"}
N_TRAIN_PER_VOICE, N_TEST_PER_VOICE = 6, 3


class Workspace:
    """A local-mode job directory and the SM_* variables the process runner would set for it."""

    def __init__(self, root: Path, task: str, train_src: Path, hps: dict, model: Path | None = None):
        self.root = root
        for d in ("input/config", "model", "output/data", "checkpoints"):
            (root / d).mkdir(parents=True, exist_ok=True)
        shutil.copytree(train_src, root / "input/data/train")
        if model is not None:
            shutil.copytree(model, root / "input/data/model")
        (root / "input/config/hyperparameters.json").write_text(json.dumps(hps))
        job = {"job_id": root.name, "model_name": "digits", "task": task,
               "base": {"model": "digits", "version": 1} if model is not None else None}
        (root / "input/config/job.json").write_text(json.dumps(job))
        channels = sorted(p.name for p in (root / "input/data").iterdir())
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SM_")}
        self.env.update({
            "SM_MODEL_DIR": str(root / "model"), "SM_INPUT_DIR": str(root / "input"),
            "SM_INPUT_CONFIG_DIR": str(root / "input/config"), "SM_OUTPUT_DIR": str(root / "output"),
            "SM_OUTPUT_DATA_DIR": str(root / "output/data"), "SM_CHECKPOINT_DIR": str(root / "checkpoints"),
            "SM_CHANNELS": json.dumps(channels), "SM_HPS": json.dumps(hps), "SM_NUM_GPUS": "0",
            "SM_NUM_CPUS": str(os.cpu_count() or 1), "SM_CURRENT_HOST": "algo-1", "SM_HOSTS": '["algo-1"]',
            "PYTHONUNBUFFERED": "1",
        })
        for name in channels:
            self.env[f"SM_CHANNEL_{name.upper()}"] = str(root / "input/data" / name)

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def output(self) -> Path:
        return self.root / "output/data"

    @property
    def failure(self) -> Path:
        return self.root / "output/failure"

    def metrics(self) -> dict:
        return json.loads((self.output / "metrics.json").read_text())

    def run(self, timeout: int = 900) -> subprocess.CompletedProcess:
        return subprocess.run([str(TRAINER_PYTHON), str(TRAIN)], env=self.env, cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout)


def must_succeed(ws: Workspace, result: subprocess.CompletedProcess) -> None:
    failure = ws.failure.read_text() if ws.failure.exists() else "-"
    assert result.returncode == 0, f"trainer failed:\n{result.stderr[-4000:]}\nfailure: {failure}"


def progress_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def in_trainer_env(code: str, timeout: int = 300) -> str:
    """Run `code` with the trainer environment's Python (torch, transformers); return its stdout."""
    result = subprocess.run([str(TRAINER_PYTHON), "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(TRAIN.parent)})
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def to_video(wav: Path, dest: Path) -> Path:
    """Wrap a clip into a video file (black frames + the audio as AAC), as a screen recording would be."""
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", "color=black:s=64x64:r=10",
                    "-i", str(wav), "-shortest", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", str(dest)],
                   check=True, capture_output=True)
    return dest


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """Training voices (split left to the trainer), held-out voices as split=test, one row as mp4."""
    out = tmp_path_factory.mktemp("digits")
    make_digit_dataset(out, TRAIN_VOICES, N_TRAIN_PER_VOICE, seed=1)
    make_digit_dataset(out, HELDOUT_VOICES, N_TEST_PER_VOICE, seed=1, split="test", append=True)
    rows = list(csv.DictReader((out / "dataset.csv").open()))
    wav = out / rows[0]["audio"]
    rows[0]["audio"] = to_video(wav, wav.with_suffix(".mp4")).relative_to(out).as_posix()
    wav.unlink()  # the trainer can only have read the video
    with (out / "dataset.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["audio", "text", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return out


@pytest.fixture(scope="module")
def fresh(digits, tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("asr") / "ws", "asr", digits, HPS)
    result = ws.run()
    must_succeed(ws, result)
    return ws, result


def test_digit_dataset_is_16k_mono_with_transcripts(digits):
    import soundfile as sf

    rows = list(csv.DictReader((digits / "dataset.csv").open()))
    assert len(rows) == N_TRAIN_PER_VOICE * len(TRAIN_VOICES) + N_TEST_PER_VOICE * len(HELDOUT_VOICES)
    assert sum(r["split"] == "test" for r in rows) == N_TEST_PER_VOICE * len(HELDOUT_VOICES)
    for r in rows[1:6]:
        words = r["text"].split()
        assert 2 <= len(words) <= 4 and set(words) <= set(DIGITS)
        info = sf.info(digits / r["audio"])
        assert (info.samplerate, info.channels) == (16000, 1)


def test_video_decodes_to_the_same_audio(digits, tmp_path):
    wav = next((digits / "clips").rglob("*.wav"))
    video = to_video(wav, tmp_path / "clip.mp4")
    mkv = tmp_path / "clip.mkv"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(video), "-c", "copy", str(mkv)], check=True)
    out = in_trainer_env(f"""
        import numpy as np
        from trainer_core.audio import decode
        a, v, k = decode({str(wav)!r}), decode({str(video)!r}), decode({str(mkv)!r})
        n = min(len(a), len(v))
        # AAC delays and pads a little: compare the envelope correlation, not samples.
        env = lambda x: np.convolve(np.abs(x[:n]), np.ones(400) / 400, mode="same")
        print(len(a), len(v), len(k), v.dtype, float(np.corrcoef(env(a), env(v))[0, 1]))
    """)
    n_wav, n_video, n_mkv, dtype, corr = out.split()
    assert dtype == "float32"
    # Codec priming and padding shift the length by a few frames, never by a quarter of a second.
    assert abs(int(n_video) - int(n_wav)) < 0.25 * 16000 and abs(int(n_mkv) - int(n_wav)) < 0.25 * 16000
    assert float(corr) > 0.8


def test_fresh_asr_reports_wer_and_cer_on_the_held_out_voices(fresh):
    ws, result = fresh
    metrics = ws.metrics()
    for key in ("wer", "cer", "test_size", "train_size", "val_size", "best_epoch", "epochs_run", "examples"):
        assert key in metrics, metrics.keys()
    # The test split is exactly the held-out voices, and the split is stated.
    assert metrics["eval_split"] == "test" and metrics["test_size"] == N_TEST_PER_VOICE * len(HELDOUT_VOICES)
    assert metrics["train_size"] + metrics["val_size"] == N_TRAIN_PER_VOICE * len(TRAIN_VOICES)
    assert 0.0 <= metrics["wer"] and 0.0 <= metrics["cer"]
    assert 1 <= metrics["best_epoch"] <= metrics["epochs_run"] == int(HPS["epochs"])
    assert len(metrics["examples"]) > 0 and all(set(e["reference"].split()) <= set(DIGITS) for e in metrics["examples"])
    # An untrained CTC head emits long strings of random characters (CER well above 1); training
    # must beat it on validation.
    best = min(h["val_cer"] for h in metrics["history"])
    assert best < metrics["initial_val_cer"], (best, metrics["initial_val_cer"])
    print(f"fresh model: test WER {metrics['wer']:.3f}, CER {metrics['cer']:.3f} on {metrics['test_size']} held-out "
          f"clips; untrained validation CER {metrics['initial_val_cer']:.2f}; {metrics['training_seconds']} s")

    lines = progress_lines(result.stdout)
    assert [line["epoch"] for line in lines] == list(range(1, int(HPS["epochs"]) + 1))
    for line in lines:
        assert {"train_loss", "val_loss", "val_wer", "val_cer", "val_empty"} <= set(line["metrics"])
    assert (ws.output / "training_curves.png").read_bytes().startswith(b"\x89PNG")
    card = (ws.model / "README.md").read_text()
    assert "WER" in card and "CER" in card  # the card states the figures, the split and its size
    assert f"test {metrics['test_size']}" in card
    empty = sum(not e["prediction"] for e in metrics["examples"]) / len(metrics["examples"])
    assert 0 <= metrics["empty_transcriptions"] <= 1
    if metrics["empty_transcriptions"] >= 0.9:  # stored despite the collapse (on_blank_collapse=warn): said so
        assert empty >= 0.5, metrics["examples"]
        assert any("collapsed to blanks" in w for w in metrics["warnings"]) and "collapsed to blanks" in card


def test_a_model_that_collapses_to_blanks_fails_with_that_reason(digits, tmp_path):
    """Two epochs from scratch leave a fresh CTC model on the all-blank plateau (every held-out clip
    transcribed as nothing): by default that is a failed job naming the collapse, and no model."""
    hps = {k: v for k, v in HPS.items() if k != "on_blank_collapse"} | {"epochs": "2"}
    ws = Workspace(tmp_path / "ws", "asr", digits, hps)
    result = ws.run()
    assert result.returncode == 1, result.stderr[-3000:]
    reason = ws.failure.read_text()
    assert "collapsed to blanks" in reason and "of the test clips" in reason and "on_blank_collapse=warn" in reason
    assert not any(ws.model.iterdir()), "a collapsed model is not stored"


def test_artifact_is_a_safetensors_directory_the_asr_pipeline_loads(fresh, digits):
    ws, _ = fresh
    files = {p.name for p in ws.model.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "vocab.json", "tokenizer_config.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".py")) for name in files)
    vocab = json.loads((ws.model / "vocab.json").read_text())
    assert vocab["<pad>"] == 0 and "|" in vocab and "<unk>" in vocab
    assert set("".join(DIGITS)) <= set(vocab)
    clip = next((digits / "clips" / "test").glob("*.wav"))
    out = in_trainer_env(f"""
        import json, soundfile as sf
        from transformers import pipeline
        asr = pipeline("automatic-speech-recognition", model={str(ws.model)!r}, device="cpu")
        audio, rate = sf.read({str(clip)!r}, dtype="float32")
        print(json.dumps([asr({str(clip)!r}), asr({{"raw": audio, "sampling_rate": rate}}), asr.model.config.vocab_size]))
    """)
    by_path, by_array, vocab_size = json.loads(out.strip().splitlines()[-1])
    assert isinstance(by_path["text"], str) and isinstance(by_array["text"], str)
    assert vocab_size == len(vocab)


def test_rerun_resumes_from_the_checkpoint(fresh):
    ws, _ = fresh
    before = ws.metrics()
    result = ws.run()
    must_succeed(ws, result)
    assert "resumed from checkpoint after epoch" in result.stderr
    assert progress_lines(result.stdout) == []  # every epoch was done: nothing left to train
    after = ws.metrics()
    # The best weights come back from the checkpoint: the same model, the same figures.
    assert (after["wer"], after["cer"], after["best_epoch"]) == (before["wer"], before["cer"], before["best_epoch"])


TINY_BASE = """
    import json, sys, tempfile
    from pathlib import Path
    from transformers import (Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC,
                              Wav2Vec2Processor)
    out = Path(sys.argv[1])
    # A tiny "pretrained" recogniser whose vocabulary lacks most digit letters, and has a 'q'.
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, "o": 5, "n": 6, "e": 7, "q": 8}
    tmp = Path(tempfile.mkdtemp())
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    tok = Wav2Vec2CTCTokenizer(str(tmp / "vocab.json"))
    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, do_normalize=True, return_attention_mask=True)
    cfg = Wav2Vec2Config(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, conv_dim=(16,) * 7, feat_extract_norm="layer", do_stable_layer_norm=True,
                         num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, pad_token_id=0)
    Wav2Vec2ForCTC(cfg).save_pretrained(out, safe_serialization=True)
    Wav2Vec2Processor(feature_extractor=fe, tokenizer=tok).save_pretrained(out)
"""


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base") / "tiny-asr"
    subprocess.run([str(TRAINER_PYTHON), "-c", textwrap.dedent(TINY_BASE), str(out)], check=True, timeout=300)
    return out


def test_asr_from_a_base_merges_the_vocabularies(digits, tiny_base, tmp_path):
    base_vocab = json.loads((tiny_base / "vocab.json").read_text())
    hps = {"epochs": "1", "batch_size": "8", "learning_rate": "0.001"}
    ws = Workspace(tmp_path / "ws", "asr", digits, hps, model=tiny_base)
    result = ws.run()
    must_succeed(ws, result)
    vocab = json.loads((ws.model / "vocab.json").read_text())
    # The base's ids are kept (its trained output rows stay meaningful); new characters follow.
    assert {t: vocab[t] for t in base_vocab} == base_vocab
    assert set("".join(DIGITS)) <= set(vocab) and "q" in vocab
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert min(vocab[c] for c in set("".join(DIGITS)) - set(base_vocab)) == len(base_vocab)
    config = json.loads((ws.model / "config.json").read_text())
    assert config["vocab_size"] == len(vocab) and config["hidden_size"] == 32  # the base's architecture
    assert config["retrain"]["lineage"][-1]["base"] == {"model": "digits", "version": 1}
    metrics = ws.metrics()
    assert metrics["base_model"] is True and set(metrics["added_characters"]) == set("".join(DIGITS)) - set(base_vocab)
    assert "wer" in metrics and metrics["test_size"] > 0


@pytest.mark.parametrize("poison", ["auto_map", "python_file", "pickle_only"])
def test_unsafe_base_models_are_refused_with_a_reason(digits, tiny_base, tmp_path, poison):
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    if poison == "auto_map":
        config = json.loads((base / "config.json").read_text())
        config["auto_map"] = {"AutoModelForCTC": "modeling_evil.EvilForCTC"}
        (base / "config.json").write_text(json.dumps(config))
    elif poison == "python_file":
        (base / "modeling_evil.py").write_text("import os; os.system('touch /tmp/pwned')\n")
    else:
        (base / "model.safetensors").rename(base / "pytorch_model.bin")
    ws = Workspace(tmp_path / "ws", "asr", digits, {"epochs": "1"}, model=base)
    result = ws.run(timeout=300)
    assert result.returncode != 0
    reason = ws.failure.read_text()
    expected = {"auto_map": "trust_remote_code", "python_file": "Python code", "pickle_only": "pickle"}[poison]
    assert expected in reason, reason
    assert not any(ws.model.iterdir())


def test_transcribe_writes_transcripts_and_a_pdf_report(fresh, digits, tmp_path):
    trained, _ = fresh
    files = tmp_path / "files"
    files.mkdir()
    clips = sorted((digits / "clips" / "test").glob("*.wav"))[:3]
    for c in clips:
        shutil.copy(c, files / c.name)
    to_video(clips[0], files / "lecture.mp4")
    names = [c.name for c in clips] + ["lecture.mp4"]
    (files / "dataset.csv").write_text("audio\n" + "\n".join(names) + "\n")
    ws = Workspace(tmp_path / "ws", "transcribe", files, {"epochs": "30", "batch_size": "32"}, model=trained.model)
    result = ws.run(timeout=300)
    must_succeed(ws, result)

    rows = list(csv.DictReader((ws.output / "transcripts.csv").open()))
    assert [r["audio"] for r in rows] == names
    assert all(set(r) == {"audio", "text", "seconds"} for r in rows)
    assert all(float(r["seconds"]) > 0.5 for r in rows)
    pdf = (ws.output / "report.pdf").read_bytes()
    assert pdf.startswith(b"%PDF") and len(pdf) > 1000
    lines = progress_lines(result.stdout)
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert lines[-1]["metrics"]["files_done"] == 4
    assert ws.metrics()["files"] == 4 and ws.metrics()["failed_files"] == 0
    assert not any(ws.model.iterdir()), "a transcription makes no model"


def test_transcribe_without_a_model_fails_with_a_reason(digits, tmp_path):
    ws = Workspace(tmp_path / "ws", "transcribe", digits, {})
    result = ws.run(timeout=300)
    assert result.returncode != 0
    assert "needs an ASR model" in ws.failure.read_text()


def test_a_learning_curve_for_speech_recognition_fits_word_accuracy(digits, tmp_path):
    """The ASR trainer's curve: the same recipe on half the training split, 1 - WER fitted."""
    ws = Workspace(tmp_path / "ws", "asr", digits, {**HPS, "epochs": "2", "learning_curve": "true",
                                                      "learning_curve_fractions": "0.5"})
    result = ws.run()
    must_succeed(ws, result)
    metrics = ws.metrics()
    lc = metrics["learning_curve"]
    assert lc["metric"] == "word_accuracy" and [p["fraction"] for p in lc["points"]] == [0.5, 1.0]
    assert lc["points"][-1]["word_accuracy"] == max(0.0, 1 - metrics["wer"])
    assert lc["points"][0]["train_size"] < metrics["train_size"] and lc["eval_size"] == metrics["test_size"]
    assert "How much more data would help" in (ws.model / "README.md").read_text()
    assert (ws.model / "learning_curve.png").read_bytes().startswith(b"\x89PNG")


def test_evaluation_decodes_a_doubled_letter_as_the_asr_pipeline_does(tmp_path):
    """Greedy CTC: "three" is t h r e <blank> e. The trainer's WER must be of the text the user's
    pipeline returns; dropping the blank before merging repeats made it "thre"."""
    out = in_trainer_env(f"""
        from pathlib import Path
        from transformers import Wav2Vec2CTCTokenizer
        from speech.ctc import greedy_text
        from speech.vocab import BOS, DELIMITER, EOS, PAD, UNK, characters, fresh_vocab, write_vocab
        vocab = fresh_vocab(characters(["three two"]))
        tok = Wav2Vec2CTCTokenizer(str(write_vocab(vocab, Path({str(tmp_path)!r}))), unk_token=UNK, pad_token=PAD,
                                   bos_token=BOS, eos_token=EOS, word_delimiter_token=DELIMITER)
        v, blank = tok.get_vocab(), tok.pad_token_id
        path = [v["t"], v["t"], v["h"], v["r"], v["e"], blank, v["e"], v["e"], v["|"], v["t"], blank, v["w"], v["o"], blank]
        print(greedy_text(tok, [path])[0], "/", tok.decode(path, skip_special_tokens=False).strip())
    """)
    ours, pipelines = (part.strip() for part in out.strip().split("/"))
    assert ours == pipelines == "three two"
