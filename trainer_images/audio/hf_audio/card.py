"""model_card.md of a fine-tuned Hugging Face classifier: use, data, metrics, lineage, hyperparameters."""

from __future__ import annotations

from pathlib import Path

from trainer_core.fit import epochs_sentence
from trainer_core.learning_curve import card_section


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_card(model_dir: Path, *, job: dict, base: dict, labels: list[str], label_counts: dict[str, dict[str, int]],
               hyperparameters: dict, metrics: dict, lineage: list[dict], notes: list[str]) -> None:
    name = job.get("model_name") or "audio classifier"
    lines = [
        f"# {name}",
        "",
        f"Audio classifier fine-tuned from a Hugging Face `{base.get('model_type')}` model "
        f"({', '.join(base.get('architectures') or []) or 'encoder'}) by the retrain service.",
        "",
        "## Use",
        "",
        "A standard transformers model directory (safetensors weights, config with the labels, feature",
        f"extractor config; audio at {metrics.get('sampling_rate')} Hz mono):",
        "",
        "```python",
        "from transformers import pipeline",
        "classify = pipeline('audio-classification', model='path/to/this/dir')",
        "print(classify('clip.wav'))",
        "```",
        "",
        "## Data",
        "",
        "| label | train | validation | test |",
        "|---|---:|---:|---:|",
    ]
    for label in labels:
        c = label_counts.get(label, {})
        lines.append(f"| {label} | {c.get('train', 0)} | {c.get('validation', 0)} | {c.get('test', 0)} |")
    lines += [
        f"| **total** | {metrics['train_size']} | {metrics['val_size']} | {metrics['test_size']} |",
        "",
        *[f"- {n}" for n in notes],
        "",
        f"## Metrics (on the {metrics['eval_split']} split, {metrics['eval_size']} clips)",
        "",
        "| metric | value |",
        "|---|---:|",
        *[f"| {key} | {metrics[key]:.4f} |" for key in ("accuracy", "macro_precision", "macro_recall", "macro_f1")],
        "",
        "| label | precision | recall | f1 | support |",
        "|---|---:|---:|---:|---:|",
        *[f"| {label} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |"
          for label, m in metrics["per_class"].items()],
        "",
        epochs_sentence(metrics),
        "Plots: `training_curves.png`, `confusion_matrix.png`"
        + (", `learning_curve.png`." if metrics.get("learning_curve") else "."),
        "",
        *card_section(metrics.get("learning_curve")),
        "## Lineage",
        "",
    ]
    for i, step in enumerate(lineage):
        desc = ", ".join(f"{k}={v}" for k, v in step.items() if v not in (None, "", []))
        lines.append(f"{i + 1}. {desc}")
    lines += [
        "",
        "## Hyperparameters",
        "",
        "| name | value |",
        "|---|---|",
        *[f"| {k} | {_fmt(v)} |" for k, v in hyperparameters.items()],
        "",
    ]
    (model_dir / "model_card.md").write_text("\n".join(lines))
