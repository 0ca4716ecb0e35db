"""What the `asr` task hands back besides the weights: the curves, the model card, and the proof
that `transformers.pipeline` loads the directory."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from trainer_core.errors import TrainerError
from trainer_core.fit import epochs_sentence
from trainer_core.learning_curve import card_section

from . import SAMPLE_RATE
from .asr_args import ASRArguments


def plot_curves(history: list[dict], best_epoch: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], label="validation")
    ax_loss.set(title="CTC loss", xlabel="epoch")
    ax_err.plot(epochs, [h["val_wer"] for h in history], label="validation WER")
    ax_err.plot(epochs, [h["val_cer"] for h in history], label="validation CER")
    ax_err.set(title="Validation error rates", xlabel="epoch", ylim=(0, max(1.05, *[h["val_wer"] for h in history])))
    for ax in (ax_loss, ax_err):
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch ({best_epoch})")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_card(model_dir: Path, job: dict, metrics: dict, args: ASRArguments, lineage: list, notes: list[str],
               vocab: list[str]) -> None:
    name = job.get("model_name") or "asr-model"
    lines = [
        f"# {name}", "",
        "A CTC speech recogniser (wav2vec2-style) trained by the retrain service, task `asr`.", "",
        "```python", "from transformers import pipeline",
        'asr = pipeline("automatic-speech-recognition", model="path/to/this/directory")',
        'print(asr("recording.wav")["text"])', "```", "",
        *[f"> **Warning**: {w}" for w in metrics["warnings"]], "",
        "## Evaluation", "",
        f"Reported on the **{metrics['eval_split']}** split ({metrics['eval_size']} clips, never used for training"
        + (" or choosing the epoch" if metrics["eval_split"] == "test" else "") + "), greedy CTC decoding, "
        "transcripts normalised (case, ignored punctuation, whitespace).", "",
        "| metric | value |", "|---|---|",
        f"| WER | {metrics['wer']:.4f} |", f"| CER | {metrics['cer']:.4f} |",
        f"| untrained model, validation WER / CER | {metrics['initial_val_wer']} / {metrics['initial_val_cer']} |",
        "",
        "## Data", "",
        f"train {metrics['train_size']} clips ({metrics['train_seconds']:.0f} s), validation {metrics['val_size']}, "
        f"test {metrics['test_size']}.", "",
        *[f"- {n}" for n in notes], "",
        "## Training", "",
        f"{epochs_sentence(metrics)} {metrics['training_seconds']:.0f} s of training.", "",
        f"Vocabulary ({len(vocab)} tokens): `{' '.join(vocab)}`", "",
        "Hyperparameters:", "", "```json", json.dumps(asdict(args), indent=1), "```", "",
        *card_section(metrics.get("learning_curve")),
        "## Examples", "", "| reference | transcription |", "|---|---|",
        *[f"| {e['reference']} | {e['prediction']} |" for e in metrics["examples"]], "",
        "## Lineage", "",
        *[f"- job {s.get('job_id')}: model {s.get('model_name')}, base {json.dumps(s.get('base'))}, "
          f"{s.get('train_size')} training clips" for s in lineage], "",
    ]
    (model_dir / "README.md").write_text("\n".join(lines))


def check_pipeline_loads(model_dir: Path, clip: np.ndarray) -> str:
    """The artifact's promise: the standard pipeline loads it with nothing of ours."""
    from transformers import pipeline

    try:
        asr = pipeline("automatic-speech-recognition", model=str(model_dir), device="cpu")
        return asr({"raw": clip, "sampling_rate": SAMPLE_RATE})["text"]
    except Exception as e:  # noqa: BLE001
        raise TrainerError(f"The saved model does not load with transformers.pipeline: {type(e).__name__}: {e}") from None
