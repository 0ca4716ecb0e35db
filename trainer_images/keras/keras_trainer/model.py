"""The model: a fresh small CNN on log-mel features, or an uploaded `.keras` model with its output
layer adapted to the job's labels. The log-mel front end is a built-in Keras layer inside the
graph, so the saved `model.keras` takes raw 16 kHz audio and loads with plain Keras."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from .errors import TrainerError


def find_base_model(channel: Path | None) -> Path | None:
    if channel is None or not channel.exists():
        return None
    if channel.is_file():
        return channel if channel.suffix == ".keras" else None
    preferred = channel / "model.keras"
    if preferred.exists():
        return preferred
    found = sorted(channel.rglob("*.keras"))
    if not found:
        raise TrainerError(
            f"the base model channel has no .keras file (found: {', '.join(sorted(p.name for p in channel.iterdir())[:10]) or 'nothing'}); "
            "the Keras trainer retrains models saved with model.save('model.keras')")
    return found[0]


def base_labels(model_path: Path) -> list[str] | None:
    path = model_path.parent / "labels.json"
    try:
        labels = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return [str(x) for x in labels] if isinstance(labels, list) else None


def _walk(node, found: list[tuple[str, str, str]]) -> None:
    if isinstance(node, dict):
        cls, module = node.get("class_name"), node.get("module")
        if isinstance(cls, str):
            name = node.get("config", {}).get("name", "?") if isinstance(node.get("config"), dict) else "?"
            if cls == "Lambda":
                found.append(("lambda", cls, str(name)))
            elif isinstance(module, str) and not (module == "keras" or module.startswith("keras.") or module == "builtins"):
                found.append(("custom", f"{module}.{cls}", str(name)))
            elif isinstance(node.get("registered_name"), str) and ">" in node["registered_name"]:
                found.append(("custom", node["registered_name"], str(name)))
        for value in node.values():
            _walk(value, found)
    elif isinstance(node, list):
        for value in node:
            _walk(value, found)


def check_safe(model_path: Path) -> None:
    """Refuse, with a reason a user can act on, what safe loading would refuse or cannot load:
    Lambda layers (arbitrary Python) and custom classes (code we do not have)."""
    try:
        with zipfile.ZipFile(model_path) as zf:
            config = json.loads(zf.read("config.json"))
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise TrainerError(f"{model_path.name} is not a Keras 3 .keras archive ({exc}); save the model with model.save('model.keras')") from exc
    found: list[tuple[str, str, str]] = []
    _walk(config.get("config", config), found)
    lambdas = [name for kind, _, name in found if kind == "lambda"]
    if lambdas:
        raise TrainerError(
            f"the base model contains Lambda layer(s) {', '.join(lambdas)}: Lambda layers carry arbitrary Python code and "
            "are refused for safety. Replace them with built-in Keras layers and upload the model again.")
    custom = sorted({cls for kind, cls, _ in found if kind == "custom"})
    if custom:
        raise TrainerError(
            f"the base model uses custom object(s) {', '.join(custom)}: only built-in Keras layers can be loaded "
            "(custom code is never imported). Rebuild the model from built-in layers and upload it again.")


def load_base(model_path: Path):
    import keras

    check_safe(model_path)
    try:
        return keras.saving.load_model(str(model_path), compile=False, safe_mode=True)
    except Exception as exc:  # noqa: BLE001 - any load failure is the user's model
        raise TrainerError(f"could not load the base model {model_path.name} safely: {exc}") from exc


def waveform_length(model) -> int:
    shape = tuple(model.inputs[0].shape)
    if len(model.inputs) != 1 or len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] != 1) or not shape[1]:
        raise TrainerError(
            f"the base model's input has shape {shape}: the Keras trainer retrains models that take raw mono audio "
            "(batch, samples) and carry their feature front end inside (e.g. keras.layers.MelSpectrogram)")
    return int(shape[1])


def build_fresh(n_classes: int, n_samples: int, sample_rate: int, n_mels: int):
    import keras
    from keras import layers

    inputs = keras.Input((n_samples,), name="waveform")
    x = layers.MelSpectrogram(
        fft_length=512, sequence_stride=sample_rate // 100, sequence_length=int(sample_rate * 0.025),
        sampling_rate=sample_rate, num_mel_bins=n_mels, min_freq=20.0, max_freq=sample_rate / 2,
        power_to_db=True, top_db=80.0, name="log_mel")(inputs)  # (batch, mels, frames)
    x = layers.Permute((2, 1), name="frames_first")(x)
    x = layers.Reshape((-1, n_mels, 1), name="add_channel")(x)
    x = layers.BatchNormalization(momentum=0.9, name="feature_norm")(x)
    for i, filters in enumerate((16, 32, 64)):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"bn{i}")(x)
        x = layers.ReLU(name=f"relu{i}")(x)
        x = layers.MaxPooling2D(2, padding="same", name=f"pool{i}")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(0.2, name="dropout")(x)
    outputs = layers.Dense(n_classes, activation="softmax", name="head")(x)
    return keras.Model(inputs, outputs, name="retrain_keras_cnn")


def adapt_head(model, labels: list[str], old_labels: list[str] | None, freeze_base: bool, log) -> object:
    """A model that ends in a softmax over `labels`, keeping every layer before the old output
    Dense. Rows of labels the base already knew keep their weights."""
    import keras
    from keras import layers

    idx = len(model.layers) - 1
    while idx >= 0 and isinstance(model.layers[idx], (layers.Activation, layers.Softmax)):
        idx -= 1
    if idx < 0 or not isinstance(model.layers[idx], layers.Dense):
        raise TrainerError("the base model does not end in a Dense output layer, so it cannot be adapted to new labels")
    old = model.layers[idx]
    features = old.input
    weights = old.get_weights()
    kernel, bias = weights[0], (weights[1] if old.use_bias else None)
    n_old = kernel.shape[1]
    if old_labels is not None and len(old_labels) != n_old:
        log(f"labels.json next to the base model lists {len(old_labels)} labels but the output has {n_old}: ignoring it")
        old_labels = None
    if old_labels is None and n_old == len(labels):
        log("base model labels unknown; its output size matches the job's classes: keeping the output weights in order")
        old_labels = list(labels)

    head = layers.Dense(len(labels), activation="softmax", name=f"{old.name}_retrained")
    outputs = head(features)
    new = keras.Model(model.inputs, outputs, name=model.name)
    w = np.array(head.get_weights()[0])
    b = np.zeros(len(labels), dtype=w.dtype)
    kept = []
    if old_labels is not None:
        for j, label in enumerate(labels):
            if label in old_labels:
                i = old_labels.index(label)
                w[:, j] = kernel[:, i]
                if bias is not None:
                    b[j] = bias[i]
                kept.append(label)
    head.set_weights([w, b])
    log(f"output layer adapted: {n_old} -> {len(labels)} classes; kept the weights of {len(kept)} known label(s)"
        + (f" ({', '.join(kept[:10])})" if kept else ""))
    if freeze_base:
        for layer in new.layers:
            layer.trainable = layer is head
        log("freeze_base: only the output layer trains")
    return new
