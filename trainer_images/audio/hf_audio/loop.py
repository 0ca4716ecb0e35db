"""Fine-tuning: the fit driver (trainer_core/fit.py) with this recipe: length-bucketed batches of
randomly cropped clips, cross-entropy on the model's logits, validation loss choosing the best
epoch, AdamW (no decay on biases and norms) with linear warm-up and decay, gradient accumulation.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from audio_trainer.evaluate import summarise
from trainer_core.batching import length_buckets, sorted_batches
from trainer_core.fit import Checkpoint, Plan, Recipe, Runtime, TrainState, adamw, fit, linear_schedule, plan
from trainer_core.manifest import Clip
from trainer_core.progress import log

from .args import FineTuningArguments
from .data import Collator

CHECKPOINT_NAME = "hf-audio-checkpoint.pt"


def freeze(model, args: FineTuningArguments) -> None:
    """The convolutional feature encoder of wav2vec2-style models learned generic acoustics from
    far more audio than a user's data set; fine-tuning it on a few hundred clips mostly overfits
    (Baevski et al. 2020 keep it frozen too). `freeze_base_model` trains the head alone."""
    if args.freeze_base_model:
        for p in model.base_model.parameters():
            p.requires_grad = False
        log("base model frozen: only the classification head trains")
    elif args.freeze_feature_encoder:
        if hasattr(model, "freeze_feature_encoder"):
            model.freeze_feature_encoder()
            log("feature encoder frozen")
        else:
            log(f"{type(model).__name__} has no separate feature encoder: all weights train")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(f"model: {type(model).__name__}, {total:,} parameters, {trainable:,} trainable")


def crop(audio: np.ndarray, samples: int, generator: torch.Generator | None) -> np.ndarray:
    """A random window of `samples` (training), or the start (evaluation, generator None)."""
    if len(audio) <= samples:
        return audio
    start = 0 if generator is None else int(torch.randint(0, len(audio) - samples + 1, (1,), generator=generator))
    return audio[start : start + samples]


@torch.no_grad()
def predict(model, collator: Collator, waves: list[np.ndarray], runtime: Runtime, batch_size: int,
            max_samples: int) -> np.ndarray:
    """Logits [N, n_labels] in the given order; batches of similar length, truncated to max_samples."""
    was_training = model.training
    model.eval()
    out = np.zeros((len(waves), model.config.num_labels), dtype=np.float32)
    for idx in sorted_batches([len(a) for a in waves], batch_size):
        inputs = collator([crop(waves[i], max_samples, None) for i in idx])
        with runtime.autocast():
            logits = model(**{k: v.to(runtime.device) for k, v in inputs.items()}).logits
        out[idx] = logits.float().cpu().numpy()
    model.train(was_training)
    return out


class FineTuningRecipe(Recipe):
    def __init__(self, model, collator: Collator, train_clips: list[Clip], val_clips: list[Clip], labels: list[str],
                 args: FineTuningArguments, runtime: Runtime):
        self.model, self.collator, self.labels, self.args, self.runtime = model, collator, labels, args, runtime
        index = {label: i for i, label in enumerate(labels)}
        self.audio = [c.audio for c in train_clips]
        self.targets = torch.tensor([index[c.label] for c in train_clips])
        self.val_audio = [c.audio for c in val_clips]
        self.val_targets = np.array([index[c.label] for c in val_clips])
        self.max_samples = int(args.max_length_seconds * collator.rate)
        self.max_eval_samples = int(args.max_eval_length_seconds * collator.rate)
        self.lengths = [min(len(a), self.max_samples) for a in self.audio]
        self.batch_size = min(args.batch_size, len(train_clips))
        self.criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
        self.padded = self.real = 0

    def batches(self, epoch: int, generator: torch.Generator):
        self.padded = self.real = 0
        for idx in length_buckets(self.lengths, self.batch_size, self.args.bucket_batches, generator):
            waves = [crop(self.audio[i], self.max_samples, generator) for i in idx]
            self.padded += max(len(w) for w in waves) * len(waves)
            self.real += sum(len(w) for w in waves)
            yield waves, self.targets[idx]

    def loss(self, batch):
        waves, y = batch
        device = self.runtime.device
        inputs = {k: v.to(device, non_blocking=True) for k, v in self.collator(waves).items()}
        with self.runtime.autocast():
            logits = self.model(**inputs).logits
        return self.criterion(logits.float(), y.to(device, non_blocking=True)), len(y)

    def validate(self) -> dict[str, float]:
        """On whole clips (truncated only beyond max_eval_length_seconds)."""
        logits = predict(self.model, self.collator, self.val_audio, self.runtime, self.batch_size, self.max_eval_samples)
        loss = float(nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(self.val_targets)))
        summary = summarise(self.val_targets, logits.argmax(1), self.labels)
        return {"val_loss": loss, "val_accuracy": summary["accuracy"], "val_macro_f1": summary["macro_f1"]}

    def epoch_figures(self) -> dict[str, float]:
        return {"padding_fraction": 1 - self.real / max(1, self.padded)}


def train(model, collator: Collator, train_clips: list[Clip], val_clips: list[Clip], labels: list[str],
          args: FineTuningArguments, runtime: Runtime, checkpoint_dir: Path, fingerprint: str) -> tuple[TrainState, Plan]:
    """Fine-tune `model` in place; on return it holds the weights `args.keep` names (fit.Plan)."""
    recipe = FineTuningRecipe(model, collator, train_clips, val_clips, labels, args, runtime)
    accumulation = args.gradient_accumulation_steps
    batches_per_epoch = math.ceil(len(train_clips) / recipe.batch_size)
    run = plan(epochs=args.epochs, epochs_given="epochs" in args.given,
               steps_per_epoch=math.ceil(batches_per_epoch / accumulation), batch_size=recipe.batch_size,
               patience=args.patience, min_delta=args.min_delta, min_steps=args.min_steps,
               max_grad_norm=args.max_grad_norm, accumulation=accumulation, keep=args.keep)
    log(f"{batches_per_epoch} batches of {recipe.batch_size} per epoch, an optimizer step every {accumulation}: "
        f"{run.steps_per_epoch} steps per epoch, {run.total_steps} at most")
    model.to(runtime.device)
    optimizer = adamw(model, args.learning_rate, args.weight_decay)
    state = fit(model, recipe, optimizer, linear_schedule(args.learning_rate, args.warmup_ratio, run.total_steps),
                run, runtime, Checkpoint(checkpoint_dir / CHECKPOINT_NAME, fingerprint), args.seed)
    return state, run
