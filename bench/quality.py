"""Quality you can point to: the built-in trainers on speakers they never heard.

Builds two data sets with espeak-ng (demo/spoken_words.py, demo/spoken_digits.py) whose split
column keeps the voices apart: train and validation are spoken by TRAIN_VOICES (validation is a
separate take of each word/string), test by HELDOUT_VOICES, whose accents *and* voice variants
never occur in training. Then runs the audio image's `train` entrypoint in local mode (the SM_*
variables the process runner sets, job.json for the task) in the trainer environment, exactly as
a job would run, and prints one row per trainer:

    KWS-OOD  log-mel CNN, the default recipe             keywords  accuracy on another engine (flite rms,
             (only the seed set)                                   awb) and on held-out espeak-ng accents,
                                                                   scored from the downloaded model.onnx
    CNN      log-mel CNN (audio_trainer)                 keywords  accuracy, macro F1 on unseen voices
    HF       wav2vec2 classifier (hf_audio), a small      keywords  accuracy, macro F1 on unseen voices
             configuration built here in code (random init, saved with save_pretrained as the base)
    ASR      CTC speech recogniser (speech.asr), fresh    digits    WER, CER on unseen voices

with the data sizes and the wall time of each row. A row whose trainer fails or is missing is
printed as "not run: <reason>".

    python -m bench.quality                        # CPU settings, about 10 minutes on 2 cores
    python -m bench.quality --rows kws-ood         # the out-of-domain keyword target (>= 0.95)
    python -m bench.quality --scale 4 --device cuda --cnn-epochs 40 --hf-epochs 30 --asr-epochs 60

Run it from the repository root with the service environment (.venv); the trainers run as
subprocesses in the trainer environment (RETRAIN_TRAINER_PYTHON, default .venv-trainer).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import table  # noqa: E402
from demo import spoken_words as sw  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "trainer_images" / "audio" / "train"
TRAINER_PYTHON = Path(os.environ.get("RETRAIN_TRAINER_PYTHON", ROOT / ".venv-trainer" / "bin" / "python"))

BUILD_WAV2VEC2 = textwrap.dedent("""
    import json, sys
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForSequenceClassification
    out, hidden, layers, conv = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    config = Wav2Vec2Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(2, hidden // 32),
        intermediate_size=2 * hidden, conv_dim=(conv, conv, conv, conv), conv_stride=(5, 4, 2, 2),
        conv_kernel=(10, 8, 4, 4),  # 160x down: 100 frames/s, like the log-mel CNN's 10 ms hop
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer", do_stable_layer_norm=True, classifier_proj_size=hidden,
        mask_time_prob=0.0, layerdrop=0.0, num_labels=2,
    )
    model = Wav2Vec2ForSequenceClassification(config)
    model.save_pretrained(out, safe_serialization=True)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(out)
    print(json.dumps({"parameters": sum(p.numel() for p in model.parameters())}))
""")


def keyword_data(out: Path, words: list[str], repeats: int, heldout_repeats: int, seed: int) -> Path:
    """Train: every word x TRAIN_VOICES x repeats; validation: one more take of each by the same voices;
    test: HELDOUT_VOICES (never in training)."""
    sw.make_dataset(out, words, sw.TRAIN_VOICES, repeats=repeats, seed=seed, split="train")
    sw.make_dataset(out, words, sw.TRAIN_VOICES, repeats=1, seed=seed + 1, split="validation", append=True)
    sw.make_dataset(out, words, sw.HELDOUT_VOICES, repeats=heldout_repeats, seed=seed + 2, split="test", append=True)
    return out


def digit_data(out: Path, per_voice: int, val_per_voice: int, test_per_voice: int, seed: int) -> Path:
    """Train: espeak-ng's TRAIN_VOICES and EXTRA_TRAIN_VOICES (74 speakers in 3 accents); validation:
    TRAIN_VOICES; test: the held-out accents, never heard in training."""
    from demo.spoken_digits import HELDOUT_VOICES, TRAIN_VOICES, make_digit_dataset
    from demo.spoken_words import EXTRA_TRAIN_VOICES

    make_digit_dataset(out, TRAIN_VOICES + EXTRA_TRAIN_VOICES, per_voice, seed, split="train")
    make_digit_dataset(out, TRAIN_VOICES, val_per_voice, seed + 1, split="validation", append=True)
    make_digit_dataset(out, HELDOUT_VOICES, test_per_voice, seed + 2, split="test", append=True)
    return out


def ood_keyword_data(out: Path, words: list[str], repeats: int, test_repeats: int, seed: int) -> Path:
    """Train: espeak-ng's TRAIN_VOICES and EXTRA_TRAIN_VOICES (its Klatt and named variants, in the
    training accents); validation: another take by TRAIN_VOICES; test: flite's voices (another
    engine) and the held-out espeak-ng accents, none of which is ever heard in training."""
    sw.make_dataset(out, words, sw.TRAIN_VOICES + sw.EXTRA_TRAIN_VOICES, repeats=repeats, seed=seed, split="train")
    sw.make_dataset(out, words, sw.TRAIN_VOICES, repeats=1, seed=seed + 1, split="validation", append=True)
    sw.make_dataset(out, words, sw.OTHER_ENGINE_VOICES, repeats=test_repeats, seed=seed + 2, split="test", append=True)
    sw.make_dataset(out, words, sw.HELDOUT_VOICES, repeats=1, seed=seed + 3, split="test", append=True)
    return out


def score_onnx_by_voice(model_dir: Path, data: Path) -> dict[str, tuple[int, int]]:
    """The artifact as a client uses it: model.onnx on each test clip; (correct, total) per test
    group (the flite voices, the held-out espeak-ng accents)."""
    import csv

    import numpy as np
    import onnxruntime as ort
    import soundfile as sf

    labels = json.loads((model_dir / "labels.json").read_text())
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    counts: dict[str, list[int]] = {}
    with (data / "dataset.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            if row.get("split") != "test":
                continue
            audio, _ = sf.read(data / row["audio"], dtype="float32")
            logits = session.run(None, {name: audio[None, :]})[0]
            group = "flite" if "flite_" in row["audio"] else "espeak-ng held-out accents"
            c = counts.setdefault(group, [0, 0])
            c[0] += labels[int(np.argmax(logits))] == row["label"]
            c[1] += 1
    return {g: (c[0], c[1]) for g, c in counts.items()}


def split_sizes(data: Path) -> dict[str, int]:
    import csv

    with (data / "dataset.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    return {s: sum(r.get("split") == s for r in rows) for s in ("train", "validation", "test")}


def device_env(device: str) -> dict[str, str]:
    if device == "cpu":
        return {"SM_NUM_GPUS": "0", "CUDA_VISIBLE_DEVICES": ""}
    if device == "cuda":
        return {"SM_NUM_GPUS": "1"}
    return {}  # auto: a GPU when torch sees one


def run_job(root: Path, data: Path, task: str, hps: dict, device: str, base: Path | None, timeout: int) -> tuple[dict | None, str, float]:
    """One local-mode job: the directory the process runner would lay out, the SM_* variables, `train`.
    Returns (metrics or None, failure reason, wall seconds)."""
    if root.exists():
        shutil.rmtree(root)
    for d in ("input/config", "model", "output/data", "checkpoints"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copytree(data, root / "input/data/train")  # a copy, as the worker stages it (small data sets)
    if base is not None:
        shutil.copytree(base, root / "input/data/model")
    (root / "input/config/hyperparameters.json").write_text(json.dumps(hps))
    (root / "input/config/job.json").write_text(json.dumps({"job_id": root.name, "model_name": f"bench-{root.name}",
                                                            "task": task, "hyperparameters": hps}))
    channels = sorted(p.name for p in (root / "input/data").iterdir())
    env = {k: v for k, v in os.environ.items() if not k.startswith("SM_")}
    env.update({
        "SM_MODEL_DIR": str(root / "model"), "SM_INPUT_DIR": str(root / "input"),
        "SM_INPUT_CONFIG_DIR": str(root / "input/config"), "SM_OUTPUT_DIR": str(root / "output"),
        "SM_OUTPUT_DATA_DIR": str(root / "output/data"), "SM_CHECKPOINT_DIR": str(root / "checkpoints"),
        "SM_CHANNELS": json.dumps(channels), "SM_HPS": json.dumps(hps), "SM_NUM_CPUS": str(os.cpu_count() or 1),
        "SM_CURRENT_HOST": "algo-1", "SM_HOSTS": '["algo-1"]', "PYTHONUNBUFFERED": "1",
        **{f"SM_CHANNEL_{n.upper()}": str(root / "input/data" / n) for n in channels},
        **device_env(device),
    })
    started = time.monotonic()
    log_path = root / "train.log"
    with log_path.open("w") as log:
        try:
            proc = subprocess.run([str(TRAINER_PYTHON), str(TRAIN)], env=env, cwd=ROOT, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = None
    wall = time.monotonic() - started
    if rc == 0:
        return json.loads((root / "output/data/metrics.json").read_text()), "", wall
    failure = root / "output/failure"
    reason = failure.read_text().strip() if failure.exists() else ""
    if rc is None:
        reason = f"timed out after {timeout}s"
    return None, reason or f"exit code {rc}, see {log_path}", wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="work folder (kept); default a temporary one, removed at the end")
    ap.add_argument("--rows", default="kws-ood,cnn,hf,asr", help="which rows to run, comma separated")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="passed to the trainers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=int, default=1, help="multiplies the takes per voice (data size)")
    ap.add_argument("--words", default=",".join(sw.DEFAULT_WORDS), help="keywords, comma separated")
    ap.add_argument("--repeats", type=int, default=2, help="training takes of each word per training voice")
    ap.add_argument("--digits-per-voice", type=int, default=6, help="training digit strings per training voice (74 voices)")
    ap.add_argument("--ood-repeats", type=int, default=2, help="kws-ood: training takes per word and training voice")
    ap.add_argument("--ood-test-repeats", type=int, default=6, help="kws-ood: takes per word and flite voice")
    ap.add_argument("--cnn-epochs", type=int, default=20)
    ap.add_argument("--hf-epochs", type=int, default=12)
    ap.add_argument("--asr-epochs", type=int, default=0, help="0: the trainer's default")
    ap.add_argument("--hf-hidden", type=int, default=64, help="wav2vec2 hidden size of the HF base built in code")
    ap.add_argument("--hf-layers", type=int, default=2)
    ap.add_argument("--learning-curve", action="store_true", help="CNN row: learning_curve=true, print 2x/4x predictions")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per trainer run")
    args = ap.parse_args(argv)
    rows_wanted = {r.strip() for r in args.rows.split(",") if r.strip()}

    if not TRAINER_PYTHON.exists():
        print(f"the trainer environment {TRAINER_PYTHON} is missing: run deploy/local/install.sh", file=sys.stderr)
        return 2
    work = args.out or Path(tempfile.mkdtemp(prefix="retrain-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    words = [w.strip() for w in args.words.split(",") if w.strip()]
    s = args.scale
    results: list[list] = []
    headers = ["row", "data (train/val/test)", "accuracy", "macro F1", "WER", "CER", "epochs", "wall s"]
    started = time.monotonic()

    kws = None
    if rows_wanted & {"cnn", "hf"}:
        t = time.monotonic()
        kws = keyword_data(work / "keywords", words, args.repeats * s, s, args.seed)
        sizes = split_sizes(kws)
        print(f"keywords: {len(words)} words, {sizes} clips in {time.monotonic() - t:.0f}s "
              f"(test voices: {', '.join(v.name for v in sw.HELDOUT_VOICES)})", flush=True)

    def sizes_text(m: dict) -> str:
        return f"{m['train_size']}/{m['val_size']}/{m['test_size']}"

    if "kws-ood" in rows_wanted:
        t = time.monotonic()
        ood = ood_keyword_data(work / "keywords-ood", words, args.ood_repeats, args.ood_test_repeats, args.seed)
        print(f"keywords (out of domain): {split_sizes(ood)} clips in {time.monotonic() - t:.0f}s", flush=True)
        hps = {"seed": str(args.seed)}  # the default recipe: what a user who sets nothing gets
        m, why, wall = run_job(work / "job-kws-ood", ood, "audio_classification", hps, args.device, None, args.timeout)
        name = "KWS out of domain: CNN, default recipe"
        if m:
            groups = score_onnx_by_voice(work / "job-kws-ood" / "model", ood)
            correct, total = sum(c for c, _ in groups.values()), sum(n for _, n in groups.values())
            results.append([name, sizes_text(m), round(correct / total, 4), m["macro_f1"], "", "", m["epochs_run"],
                            round(wall)])
            for group, (c, n) in groups.items():
                print(f"  kws-ood, {group}: {c}/{n} = {c / n:.3f} (model.onnx, as a client scores it)")
            print(f"  kws-ood: {m['training_seconds']} s of training; target >= 0.95 on all test voices, "
                  f"in <= 600 s on this machine's CPU", flush=True)
        else:
            results.append([name, "", f"not run: {why}", "", "", "", "", round(wall)])

    if "cnn" in rows_wanted:
        hps = {"epochs": str(args.cnn_epochs), "batch_size": "16", "learning_rate": "0.003", "patience": "8",
               "seed": str(args.seed)}
        if args.learning_curve:
            hps["learning_curve"] = "true"
        m, why, wall = run_job(work / "job-cnn", kws, "audio_classification", hps, args.device, None, args.timeout)
        name = "CNN log-mel (audio_trainer), keywords"
        if m:
            results.append([name, sizes_text(m), m["accuracy"], m["macro_f1"], "", "", m["epochs_run"], round(wall)])
            lc = m.get("learning_curve")
            if lc:
                print(f"CNN learning curve ({lc['fit']['method']}): "
                      + ", ".join(f"n={p['train_size']}: {p['metric']:.3f}" for p in lc["points"])
                      + f"; predicted macro F1 at 2x {lc['predicted_at_2x']:.3f}, at 4x {lc['predicted_at_4x']:.3f}")
        else:
            results.append([name, "", f"not run: {why}", "", "", "", "", round(wall)])
        print(f"cnn done in {wall:.0f}s", flush=True)

    if "hf" in rows_wanted:
        name = f"HF wav2vec2 (hf_audio, {args.hf_layers}x{args.hf_hidden}, random init), keywords"
        base = work / "wav2vec2-base"
        shutil.rmtree(base, ignore_errors=True)
        build = subprocess.run([str(TRAINER_PYTHON), "-c", BUILD_WAV2VEC2, str(base), str(args.hf_hidden),
                                str(args.hf_layers), str(args.hf_hidden)], capture_output=True, text=True)
        if build.returncode != 0:
            results.append([name, "", "not run: building the wav2vec2 base failed: "
                            + (build.stderr.strip().splitlines() or ["?"])[-1], "", "", "", "", 0])
        elif not (TRAIN.parent / "hf_audio" / "main.py").exists():
            results.append([name, "", "not run: trainer_images/audio/hf_audio is not there yet", "", "", "", "", 0])
        else:
            hps = {"epochs": str(args.hf_epochs), "batch_size": "8", "learning_rate": "0.001", "patience": "6",
                   "seed": str(args.seed), "freeze_feature_encoder": "false"}
            m, why, wall = run_job(work / "job-hf", kws, "audio_classification", hps, args.device, base, args.timeout)
            if m:
                results.append([name, sizes_text(m), m["accuracy"], m["macro_f1"], "", "", m["epochs_run"], round(wall)])
            else:
                results.append([name, "", f"not run: {why}", "", "", "", "", round(wall)])
            print(f"hf done in {wall:.0f}s", flush=True)

    if "asr" in rows_wanted:
        name = "ASR conformer CTC (speech.asr, fresh, default recipe), digit strings"
        if not (ROOT / "demo" / "spoken_digits.py").exists():
            results.append([name, "", "not run: demo/spoken_digits.py is not there yet", "", "", "", "", 0])
        elif not (TRAIN.parent / "speech" / "asr.py").exists():
            results.append([name, "", "not run: trainer_images/audio/speech/asr.py is not there yet", "", "", "", "", 0])
        else:
            t = time.monotonic()
            digits = digit_data(work / "digits", args.digits_per_voice * s, 3 * s, 8 * s, args.seed)
            print(f"digits: {split_sizes(digits)} utterances in {time.monotonic() - t:.0f}s", flush=True)
            hps = {"seed": str(args.seed)}  # the default recipe for a fresh model
            if args.asr_epochs:
                hps["epochs"] = str(args.asr_epochs)
            m, why, wall = run_job(work / "job-asr", digits, "asr", hps, args.device, None, args.timeout)
            if m:
                results.append([name, sizes_text(m), "", "", m["wer"], m["cer"], m["epochs_run"], round(wall)])
                for e in m.get("examples", [])[:3]:
                    print(f"  asr example: {e['reference']!r} -> {e['prediction']!r}")
            else:
                results.append([name, "", f"not run: {why}", "", "", "", "", round(wall)])
            print(f"asr done in {wall:.0f}s", flush=True)

    print()
    print(f"Quality on voices never heard in training (test accents/variants: "
          f"{', '.join(v.name.split('+')[0] for v in sw.HELDOUT_VOICES)}); chance accuracy {1 / max(1, len(words)):.3f}; "
          f"device {args.device}; total {time.monotonic() - started:.0f}s")
    print(table(headers, results))
    if args.out is None:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"work folder (logs, models, metrics): {work}")
    return 0 if all("not run" not in str(r[2]) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
