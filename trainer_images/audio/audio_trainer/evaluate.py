"""Evaluation: predictions on clips at their natural length, sklearn metrics, and the plots.

The reported numbers come from the test split (data the model never trained on and that never
chose an epoch); metrics.json states which split and how large it was.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display in a training container
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    accuracy_score,
    classification_report,
    confusion_matrix,
    precision_recall_fscore_support,
)

from trainer_core.batching import sorted_batches  # noqa: E402
from trainer_core.progress import log  # noqa: E402


@torch.no_grad()
def predict(model, clips: list[np.ndarray], device: torch.device, batch_size: int, runtime=None) -> np.ndarray:
    """Logits [N, n_labels] for clips of any length, in the given order.

    Clips are batched by similar length and zero-padded at the end to the longest in the batch,
    as a client would pad a batch for model.onnx.
    """
    was_training = model.training
    model.eval()
    out = np.zeros((len(clips), len(model.config.labels)), dtype=np.float32)
    for idx in sorted_batches([len(a) for a in clips], batch_size):
        longest = max(len(clips[i]) for i in idx)
        batch = np.zeros((len(idx), longest), dtype=np.float32)
        for row, i in enumerate(idx):
            batch[row, : len(clips[i])] = clips[i]
        feats = model.frontend(torch.from_numpy(batch).to(device))
        ctx = runtime.autocast() if runtime is not None else torch.autocast(device.type, enabled=False)
        with ctx:
            logits = model.classify(feats)
        out[idx] = logits.float().cpu().numpy()
    model.train(was_training)
    return out


def summarise(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict:
    """Accuracy and macro precision/recall/F1 over all labels (absent ones count as 0, not skipped)."""
    ids = list(range(len(labels)))
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=ids, average="macro", zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)) if len(y_true) else 0.0,
        "macro_precision": float(p),
        "macro_recall": float(r),
        "macro_f1": float(f),
    }


def full_report(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict:
    ids = list(range(len(labels)))
    report = classification_report(
        y_true, y_pred, labels=ids, target_names=labels, output_dict=True, zero_division=0
    )
    per_class = {
        label: {
            "precision": float(report[label]["precision"]),
            "recall": float(report[label]["recall"]),
            "f1": float(report[label]["f1-score"]),
            "support": int(report[label]["support"]),
        }
        for label in labels
    }
    return {
        **summarise(y_true, y_pred, labels),
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist(),
    }


def plot_curves(history: list[dict], best_epoch: int, path: Path) -> None:
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train (augmented)")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], label="validation")
    ax_loss.set(title="Loss", xlabel="epoch", ylabel="cross-entropy")
    ax_metric.plot(epochs, [h["val_accuracy"] for h in history], label="validation accuracy")
    ax_metric.plot(epochs, [h["val_macro_f1"] for h in history], label="validation macro F1")
    ax_metric.set(title="Validation metrics", xlabel="epoch", ylim=(0, 1.02))
    for ax in (ax_loss, ax_metric):
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch ({best_epoch})")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(matrix: list[list[int]], labels: list[str], title: str, path: Path) -> None:
    m = np.asarray(matrix)
    size = max(4.0, 0.5 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    threshold = m.max() / 2 if m.size else 0
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", color="white" if m[i, j] > threshold else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def subset_scores(labels: list[str], eval_clips, logits: np.ndarray, state) -> dict:
    """What a learning-curve point of a classifier reports (trainer_core/learning_curve.py)."""
    y_true = np.array([labels.index(c.label) for c in eval_clips])
    report = full_report(y_true, logits.argmax(1), labels)
    return {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"], "epochs_run": state.epoch,
            "best_epoch": state.best_epoch}


def held_out_report(splits, state, eval_clips, logits: np.ndarray, out_dir: Path) -> tuple[dict, list[Path]]:
    """What every classifier in this image reports on its held-out split: metrics.json's common
    keys (sizes, best epoch, per-class, confusion matrix) and the curve and confusion PNGs."""
    index = {label: i for i, label in enumerate(splits.labels)}
    y_true = np.array([index[c.label] for c in eval_clips])
    report = full_report(y_true, logits.argmax(1), splits.labels)
    counts: dict[str, dict[str, int]] = {}
    for name in ("train", "validation", "test"):
        for label, n in Counter(c.label for c in getattr(splits, name)).items():
            counts.setdefault(label, {})[name] = n
    metrics = {
        "accuracy": report["accuracy"],
        "macro_precision": report["macro_precision"],
        "macro_recall": report["macro_recall"],
        "macro_f1": report["macro_f1"],
        "test_size": len(splits.test),
        "train_size": len(splits.train),
        "val_size": len(splits.validation),
        "eval_size": len(eval_clips),
        "best_epoch": state.best_epoch,
        "kept_epoch": state.kept_epoch,
        "epochs_run": state.epoch,
        "best_val_loss": state.best_record().get("val_loss"),
        "num_labels": len(splits.labels),
        "eval_split": splits.eval_split,
        "stop_reason": state.stop_reason,
        "labels": splits.labels,
        "label_counts": counts,
        "per_class": report["per_class"],
        "confusion_matrix": report["confusion_matrix"],
        "notes": splits.notes,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = [out_dir / "training_curves.png", out_dir / "confusion_matrix.png"]
    plot_curves(state.history, state.best_epoch, plots[0])
    plot_confusion(report["confusion_matrix"], splits.labels,
                   f"{splits.eval_split} split ({len(eval_clips)} clips), accuracy {report['accuracy']:.3f}", plots[1])
    log(f"{splits.eval_split} ({len(eval_clips)} clips): accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f}")
    return metrics, plots
