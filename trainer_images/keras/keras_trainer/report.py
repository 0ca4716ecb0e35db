"""Classification metrics with numpy only (no scikit-learn in this image), plots and the model card."""

from __future__ import annotations

import dataclasses
import json

import numpy as np


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict:
    n = len(labels)
    cm = np.zeros((n, n), dtype=int)
    for t, p in zip(y_true, y_pred):
        cm[int(t), int(p)] += 1
    per_class = {}
    precisions, recalls, f1s = [], [], []
    for i, label in enumerate(labels):
        tp = cm[i, i]
        fp = cm[:, i].sum() - tp
        fn = cm[i, :].sum() - tp
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        per_class[label] = {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(cm[i, :].sum())}
        precisions.append(p)
        recalls.append(r)
        f1s.append(f)
    total = cm.sum()
    return {
        "accuracy": float(np.trace(cm) / total) if total else 0.0,
        "macro_precision": float(np.mean(precisions)),
        "macro_recall": float(np.mean(recalls)),
        "macro_f1": float(np.mean(f1s)),
        "per_class": per_class,
        "confusion_matrix": {"labels": labels, "matrix": cm.tolist()},
    }


def write_plots(report: dict, out_dir) -> list:
    """Loss/accuracy curves and the confusion matrix as PNG files; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = out_dir / "training_curves.png"
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, values in report["loss_curves"].items():
        axis = axes[0] if "loss" in name else axes[1]
        axis.plot(range(1, len(values) + 1), values, label=name)
    for axis, title in zip(axes, ("loss", "accuracy")):
        axis.set_xlabel("epoch")
        axis.set_title(title)
        axis.legend()
    fig.tight_layout()
    fig.savefig(curves)
    plt.close(fig)

    confusion = out_dir / "confusion_matrix.png"
    labels, matrix = report["confusion_matrix"]["labels"], np.array(report["confusion_matrix"]["matrix"])
    fig, axis = plt.subplots(figsize=(1.2 + 0.6 * len(labels), 1 + 0.6 * len(labels)))
    axis.imshow(matrix, cmap="Blues")
    axis.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    axis.set_yticks(range(len(labels)), labels)
    for (i, j), count in np.ndenumerate(matrix):
        axis.text(j, i, str(count), ha="center", va="center")
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(f"{report['eval_split']} split ({report['eval_size']} clips)")
    fig.tight_layout()
    fig.savefig(confusion)
    plt.close(fig)
    return [curves, confusion]


def model_card(report: dict, hp, labels: list[str], base: str | None) -> str:
    rows = "\n".join(f"| {label} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |"
                     for label, m in report["per_class"].items())
    return f"""# Keras audio classifier

- Base model: {base or "none (a fresh log-mel CNN)"}
- Data: {report['train_size']} training, {report['val_size']} validation, {report['test_size']} test clips; {len(labels)} labels: {", ".join(labels)}
- Hyperparameters: {json.dumps(dataclasses.asdict(hp), default=str)}
- Epochs run: {report['epochs_run']}

## Metrics on the {report['eval_split']} split ({report['eval_size']} clips)

accuracy {report['accuracy']:.3f}, macro precision {report['macro_precision']:.3f}, macro recall {report['macro_recall']:.3f}, macro F1 {report['macro_f1']:.3f}

| label | precision | recall | F1 | support |
|---|---|---|---|---|
{rows}

Input: mono float32 waveform at {hp.sample_rate} Hz; output: class probabilities in the order of labels.json.
Plots: training_curves.png, confusion_matrix.png.
"""
