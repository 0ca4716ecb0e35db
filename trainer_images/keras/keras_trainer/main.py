"""Retrain a Keras audio classifier under the container contract.

Inputs: train channel (CSV `audio,label` + audio), optional validation channel (same layout,
else a stratified split of train), optional model channel with a `.keras` file (and optionally
the labels.json it was trained with). Hyperparameters (strings, as SageMaker passes them):
epochs, batch_size, learning_rate, sample_rate, clip_seconds, validation_fraction, patience,
seed, freeze_base, n_mels.

Outputs: model/model.keras (raw audio in, class probabilities out; loads with
keras.saving.load_model(..., safe_mode=True)), model/labels.json (labels in output order),
output/data/metrics.json; progress as one JSON object per stdout line; logs on stderr;
output/failure on error.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback

import numpy as np

from .data import find_csv, load_waveforms, read_rows, read_splits, stratified_split
from .errors import TrainerError
from .model import adapt_head, base_labels, build_fresh, find_base_model, load_base, waveform_length
from .paths import HParams, Paths
from .report import classification_report, model_card, write_plots

_START = time.monotonic()


def log(message: str) -> None:
    print(f"[keras-trainer {time.monotonic() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


def _clean(v):
    v = float(v)
    return round(v, 6) if math.isfinite(v) else None


def emit_progress(epoch: int, epochs: int, step: int, metrics: dict) -> None:
    """One progress record (CONTRACT.md, "Progress"): `retrain-progress <token> <json>` with the
    worker's RETRAIN_PROGRESS_TOKEN, so nothing else this trainer prints can pass for progress;
    a bare JSON line when the variable is unset (run by hand, on SageMaker)."""
    text = json.dumps({"epoch": epoch, "epochs": epochs, "step": step,
                       "metrics": {k: _clean(v) for k, v in metrics.items()}}, allow_nan=False)
    token = os.environ.get("RETRAIN_PROGRESS_TOKEN")
    sys.stdout.write((f"retrain-progress {token} {text}" if token else text) + "\n")
    sys.stdout.flush()


def run(paths: Paths) -> dict:
    hp = HParams.load(paths.input_config)
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras

    keras.utils.set_random_seed(hp.seed)
    if "train" not in paths.channels:
        raise TrainerError("no train channel: /opt/ml/input/data/train with a CSV manifest is required")

    base_path = find_base_model(paths.channels.get("model"))
    base = load_base(base_path) if base_path else None
    n_samples = waveform_length(base) if base is not None else int(round(hp.sample_rate * hp.clip_seconds))
    log(f"base model: {base_path.name if base_path else 'none (fresh CNN)'}; clip {n_samples} samples at {hp.sample_rate} Hz")

    # Honest evaluation: the CSV's `split` column when it has one; otherwise a seeded stratified
    # test split is held out first, and validation (early stopping) is carved from the rest.
    train_csv = find_csv(paths.channels["train"])
    train_rows = read_rows(train_csv)
    x_all, names_all = load_waveforms(train_rows, hp.sample_rate, n_samples)
    labels = sorted(set(names_all))
    if len(labels) < 2:
        raise TrainerError(f"the training data has only one class ({labels[0]}): at least two are needed")
    index = {label: i for i, label in enumerate(labels)}
    y_all = np.array([index[n] for n in names_all], dtype=np.int64)
    splits = np.array(read_splits(train_csv))
    if any(splits != ""):
        tr, va, te = (np.flatnonzero(np.isin(splits, names)) for names in (("train", ""), ("validation",), ("test",)))
    else:
        rest, te = stratified_split(names_all, hp.test_fraction, hp.seed)
        tr_rel, va_rel = stratified_split([names_all[i] for i in rest], hp.validation_fraction, hp.seed + 1)
        tr, va = rest[tr_rel], rest[va_rel]
        if "validation" in paths.channels:  # a validation channel replaces the carved one
            tr, va = np.concatenate([tr, va]).astype(int), np.array([], dtype=int)
    x, y, x_val, y_val, x_test, y_test = x_all[tr], y_all[tr], x_all[va], y_all[va], x_all[te], y_all[te]
    if "validation" in paths.channels:
        val_rows = read_rows(find_csv(paths.channels["validation"]))
        x_val, val_names = load_waveforms(val_rows, hp.sample_rate, n_samples)
        unknown = sorted(set(val_names) - set(labels))
        if unknown:
            raise TrainerError(f"validation labels not in the training data: {', '.join(unknown[:10])}")
        y_val = np.array([index[n] for n in val_names], dtype=np.int64)
    log(f"{len(x)} training, {len(x_val)} validation and {len(x_test)} test clips, {len(labels)} classes: {', '.join(labels[:20])}")

    if base is not None:
        model = adapt_head(base, labels, base_labels(base_path), hp.freeze_base, log)
    else:
        model = build_fresh(len(labels), n_samples, hp.sample_rate, hp.n_mels)
    model.compile(optimizer=keras.optimizers.Adam(hp.learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    log(f"model {model.name}: {model.count_params():,} parameters")

    steps_per_epoch = math.ceil(len(x) / hp.batch_size)
    has_val = len(x_val) > 0

    class Progress(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            metrics = {"train_loss": logs.get("loss"), "train_accuracy": logs.get("accuracy")}
            if has_val:
                metrics.update(val_loss=logs.get("val_loss"), val_accuracy=logs.get("val_accuracy"))
            emit_progress(epoch + 1, hp.epochs, (epoch + 1) * steps_per_epoch,
                          {k: v for k, v in metrics.items() if v is not None})

    callbacks = [Progress()]
    paths.checkpoints.mkdir(parents=True, exist_ok=True)
    callbacks.append(keras.callbacks.ModelCheckpoint(str(paths.checkpoints / "checkpoint.keras")))
    if has_val and hp.patience > 0:
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=hp.patience,
                                                       restore_best_weights=True))
    history = model.fit(x, y, batch_size=hp.batch_size, epochs=hp.epochs, shuffle=True, verbose=0,
                        validation_data=(x_val, y_val) if has_val else None, callbacks=callbacks)

    # Reported on the test split (never seen in training or early stopping); validation only
    # when the data left no test clips, and the report says which.
    if len(x_test):
        eval_split, eval_x, eval_y = "test", x_test, y_test
    else:
        eval_split, eval_x, eval_y = ("validation", x_val, y_val) if has_val else ("train", x, y)
    pred = model.predict(eval_x, batch_size=hp.batch_size, verbose=0).argmax(axis=1)
    report = classification_report(eval_y, pred, labels)
    report.update(eval_split=eval_split, test_size=int(len(x_test)), train_size=int(len(x)), val_size=int(len(x_val)),
                  eval_size=int(len(eval_x)))
    report["epochs_run"] = len(history.history.get("loss", []))
    report["loss_curves"] = {k: [_clean(v) for v in vals] for k, vals in history.history.items()}
    report["base_model"] = base_path.name if base_path else None

    paths.model_dir.mkdir(parents=True, exist_ok=True)
    model.save(str(paths.model_dir / "model.keras"))
    (paths.model_dir / "labels.json").write_text(json.dumps(labels))
    (paths.model_dir / "preprocessing.json").write_text(json.dumps(
        {"input": "mono float32 waveform in [-1, 1]", "sample_rate": hp.sample_rate, "samples": n_samples}))
    paths.output_data.mkdir(parents=True, exist_ok=True)
    (paths.output_data / "metrics.json").write_text(json.dumps(report, indent=2))
    plots = write_plots(report, paths.model_dir)
    for plot in plots:
        (paths.output_data / plot.name).write_bytes(plot.read_bytes())
    (paths.model_dir / "model_card.md").write_text(model_card(report, hp, labels, base_path.name if base_path else None))
    log(f"done: accuracy {report['accuracy']:.3f}, macro F1 {report['macro_f1']:.3f} on the {report['eval_split']} split ({report['eval_size']} clips)")
    return report


def main() -> int:
    paths = Paths.from_env()
    try:
        run(paths)
        return 0
    except TrainerError as exc:
        reason = str(exc)
        code = 2
    except MemoryError:
        reason = "out of memory while training: use a smaller batch_size or shorter clips"
        code = 1
    except Exception as exc:  # noqa: BLE001 - anything else is a trainer failure with its reason
        traceback.print_exc(file=sys.stderr)
        reason = f"training failed: {type(exc).__name__}: {exc}"
        code = 1
    log(f"FAILED: {reason}")
    try:
        paths.failure_file.parent.mkdir(parents=True, exist_ok=True)
        paths.failure_file.write_text(reason[:4000] + "\n")
    except OSError as exc:
        log(f"could not write {paths.failure_file}: {exc}")
    return code
