"""Champion / challenger scoring (job.json task `score`): the same code scores every model.

The worker runs this after a job that asked to be promoted (spec.promote) has published its new
version. Channels:

    heldout/      dataset.csv (audio,label) and the clips it names: the user's held-out set
    challenger/   the new version's model directory
    champion/     the model directory of the alias's current holder (absent when it has none)

Each model is its exported `model.onnx` (the log-mel front end inside: 16 kHz waveform in,
logits out) with its `labels.json`, run with onnxruntime alone, so whatever trained a version,
it is scored the same way. A held-out clip whose label a model does not know counts as wrong
for that model. Writes $SM_OUTPUT_DATA_DIR/scores.json:

    {"challenger": {"accuracy": ..., "macro_f1": ..., "macro_precision": ..., "macro_recall": ...,
                    "size": n}, "champion": {...} | null}
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from trainer_core.audio import decode
from trainer_core.contract import write_failure
from trainer_core.errors import TrainerError
from trainer_core.manifest import read_manifest, resolve
from trainer_core.progress import log


def score(model_dir: Path, clips, audio: list[np.ndarray], labels: list[str]) -> dict:
    import onnxruntime as ort
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    onnx, names = model_dir / "model.onnx", model_dir / "labels.json"
    if not onnx.is_file() or not names.is_file():
        raise TrainerError(f"{model_dir.name}: no model.onnx with labels.json to score (only models of the built-in audio trainer can be compared)")
    model_labels = json.loads(names.read_text())
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    index = {label: i for i, label in enumerate(labels)}
    predicted = []
    for waveform in audio:
        logits = session.run(["logits"], {"waveform": waveform[None, :]})[0][0]
        label = model_labels[int(np.argmax(logits))]
        predicted.append(index.get(label, -1))  # a label the held-out set does not have: wrong
    y_true = np.array([index[c.label] for c in clips])
    y_pred = np.array(predicted)
    ids = list(range(len(labels)))
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=ids, average="macro", zero_division=0)
    return {"accuracy": float(accuracy_score(y_true, y_pred)), "macro_f1": float(f), "macro_precision": float(p),
            "macro_recall": float(r), "size": len(clips)}


def run() -> dict:
    data = Path(os.environ.get("SM_INPUT_DIR", "/opt/ml/input")) / "data"
    heldout = Path(os.environ.get("SM_CHANNEL_HELDOUT", data / "heldout"))
    clips = read_manifest(heldout, "heldout", "label")
    if not clips:
        raise TrainerError("heldout/dataset.csv names no clips")
    audio = [decode(resolve(heldout, clip)) for clip in clips]  # decoded once, for both models
    labels = sorted({c.label for c in clips})
    scores = {}
    for name in ("challenger", "champion"):
        channel = Path(os.environ.get(f"SM_CHANNEL_{name.upper()}", data / name))
        scores[name] = score(channel, clips, audio, labels) if channel.is_dir() else None
        if scores[name]:
            log(f"{name}: accuracy {scores[name]['accuracy']:.4f}, macro F1 {scores[name]['macro_f1']:.4f} on {len(clips)} held-out clips")
    out = Path(os.environ.get("SM_OUTPUT_DATA_DIR", "/opt/ml/output/data"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "scores.json").write_text(json.dumps(scores, indent=2))
    return scores


def main() -> int:
    try:
        run()
        return 0
    except TrainerError as err:
        reason = str(err)
    except Exception as err:  # noqa: BLE001 - still a reason for the worker
        reason = f"scoring failed: {type(err).__name__}: {err}"
    log(f"FAILED: {reason}")
    write_failure(Path(os.environ.get("SM_OUTPUT_DIR", "/opt/ml/output")), reason)
    return 1


if __name__ == "__main__":
    sys.exit(main())
