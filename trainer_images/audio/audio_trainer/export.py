"""Export: the artifacts a user loads without this project's code.

- model.onnx: input `waveform` float32 [batch, samples] mono 16 kHz (dynamic batch and length),
  output `logits` [batch, n_labels]; the log-mel front end is inside the graph.
- labels.json: the labels in logit order.
- model.safetensors + config.json: the weights and everything needed to rebuild the model, so a
  later job can continue from it.
- model_card.md: data, hyperparameters, lineage, metrics.

The ONNX graph is checked against the torch model on real clips before the job may succeed.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from trainer_core.errors import TrainerError
from trainer_core.fit import epochs_sentence
from trainer_core.learning_curve import card_section
from trainer_core.progress import log

from .model import KeywordCNN

ONNX_OPSET = 17


def save_weights(model: KeywordCNN, model_dir: Path, extra_config: dict) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    (model_dir / "config.json").write_text(json.dumps(model.config.to_json(**extra_config), indent=2))
    (model_dir / "labels.json").write_text(json.dumps(model.config.labels))


def export_onnx(model: KeywordCNN, path: Path, check_clips: list[np.ndarray]) -> float:
    """Export, then run the file in onnxruntime on real clips (single and padded batches) and
    compare with torch. Returns the largest absolute logit difference; raises if it is too big."""
    model = model.to("cpu").eval()
    example = torch.zeros(2, 16_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter about tracing; the check below is what counts
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["waveform"],
            output_names=["logits"],
            dynamic_axes={"waveform": {0: "batch", 1: "samples"}, "logits": {0: "batch"}},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )

    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(onnx.load(str(path)))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batches = [[c] for c in check_clips[:4]]
    if len(check_clips) >= 2:
        batches.append(check_clips[:8])  # a padded batch of mixed lengths
    batches.append([np.zeros(8000, dtype=np.float32)])  # silence: the log floor must not blow up
    worst = 0.0
    for clips in batches:
        longest = max(len(c) for c in clips)
        x = np.zeros((len(clips), longest), dtype=np.float32)
        for i, c in enumerate(clips):
            x[i, : len(c)] = c
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        got = session.run(["logits"], {"waveform": x})[0]
        if got.shape != expected.shape or not np.all(np.isfinite(got)):
            raise TrainerError(f"ONNX export check failed: output shape {got.shape} vs {expected.shape} or non-finite logits.")
        diff = float(np.max(np.abs(got - expected)))
        scale = float(np.max(np.abs(expected))) + 1.0
        worst = max(worst, diff)
        if diff > 5e-3 * scale:
            raise TrainerError(
                f"ONNX export check failed: onnxruntime logits differ from torch by {diff:.3g} "
                f"(batch of {len(clips)}, {longest} samples). The model was not exported."
            )
        if len(clips) == 1 and np.argmax(got) != np.argmax(expected):
            raise TrainerError("ONNX export check failed: onnxruntime and torch predict different labels.")
    log(f"model.onnx verified against torch: max |logit difference| {worst:.2e}")
    return worst


def copy_plots(plots: list[Path], model_dir: Path) -> None:
    for plot in plots:
        if plot.is_file():
            shutil.copy2(plot, model_dir / plot.name)


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def write_card(model_dir: Path, *, job: dict, labels: list[str], label_counts: dict[str, dict[str, int]],
               hyperparameters: dict, metrics: dict, lineage: list[dict], notes: list[str], config: dict) -> None:
    name = job.get("model_name") or "audio keyword classifier"
    lines = [
        f"# {name}",
        "",
        "Audio classifier: a log-mel front end and a small CNN (conv-BN-ReLU blocks, global mean+max pooling),",
        "trained by the retrain service's built-in audio trainer.",
        "",
        "## Use",
        "",
        "`model.onnx` takes `waveform`, float32 `[batch, samples]`, mono 16 kHz audio in [-1, 1] (any length,",
        "pad a batch with zeros at the end) and returns `logits` `[batch, n_labels]`; the labels, in logit",
        "order, are in `labels.json`. The feature front end is inside the graph: onnxruntime is all you need.",
        "",
        "```python",
        "import json, numpy as np, onnxruntime as ort, soundfile as sf",
        "session = ort.InferenceSession('model.onnx')",
        "labels = json.load(open('labels.json'))",
        "audio, rate = sf.read('clip.wav', dtype='float32')  # 16 kHz mono",
        "logits = session.run(['logits'], {'waveform': audio[None, :]})[0]",
        "print(labels[int(np.argmax(logits))])",
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
    ]
    for key in ("accuracy", "macro_precision", "macro_recall", "macro_f1"):
        lines.append(f"| {key} | {metrics[key]:.4f} |")
    lines += ["", "| label | precision | recall | f1 | support |", "|---|---:|---:|---:|---:|"]
    for label, m in metrics["per_class"].items():
        lines.append(f"| {label} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |")
    lines += [
        "",
        epochs_sentence(metrics),
        "Plots: `training_curves.png`, `confusion_matrix.png`"
        + (", `learning_curve.png`." if metrics.get("learning_curve") else "."),
        "",
        *card_section(metrics.get("learning_curve")),
        "## Lineage",
        "",
    ]
    if len(lineage) <= 1:
        lines.append("Trained from scratch.")
    if lineage:
        lines.append("")
        for i, step in enumerate(lineage):
            desc = ", ".join(f"{k}={v}" for k, v in step.items() if v not in (None, "", []))
            lines.append(f"{i + 1}. {desc}")
    lines += [
        "",
        "## Architecture",
        "",
        f"{config['architecture']}: n_mels={config['n_mels']}, n_fft={config['n_fft']}, hop_length={config['hop_length']}, "
        f"channels={config['channels']}, feature_norm={config['feature_norm']}, dropout={config['dropout']}, sample_rate={config['sample_rate']}",
        "",
        "## Hyperparameters",
        "",
        "| name | value |",
        "|---|---|",
        *[f"| {k} | {_fmt(v)} |" for k, v in hyperparameters.items()],
        "",
    ]
    (model_dir / "model_card.md").write_text("\n".join(lines))
