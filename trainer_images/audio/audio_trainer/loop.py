"""Training the keyword CNN: the fit driver (trainer_core/fit.py) with this recipe: fixed-length
windows of augmented waveforms (augment.py) in shuffled batches, log-mel + SpecAugment, label-
smoothed cross-entropy, AdamW with a warm-up + cosine schedule run to its end, and the final
weights kept (`keep="last"`: a validation split of the training speakers saturates within a few
epochs, so its best epoch is noise; the end of the schedule does better on speakers never heard)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from trainer_core.augment import spec_augment, warp_mel_axis
from trainer_core.fit import Checkpoint, Plan, Recipe, Runtime, TrainState, adamw, cosine_schedule, fit, plan
from trainer_core.manifest import Clip

from .args import TrainingArguments
from .augment import augment_waveforms, fixed_windows
from .evaluate import predict, summarise
from .model import KeywordCNN

CHECKPOINT_NAME = "audio-trainer-checkpoint.pt"


class KeywordRecipe(Recipe):
    def __init__(self, model: KeywordCNN, train_clips: list[Clip], val_clips: list[Clip], clip_samples: int,
                 args: TrainingArguments, runtime: Runtime):
        self.model, self.args, self.runtime, self.clip_samples = model, args, runtime, clip_samples
        index = {label: i for i, label in enumerate(model.config.labels)}
        self.audio = [c.audio for c in train_clips]
        self.targets = torch.tensor([index[c.label] for c in train_clips])
        self.val_audio = [c.audio for c in val_clips]
        self.val_targets = np.array([index[c.label] for c in val_clips])
        self.batch_size = min(args.batch_size, len(train_clips))
        self.steps_per_epoch = max(1, len(train_clips) // self.batch_size)  # the ragged tail is dropped: BatchNorm dislikes tiny batches
        self.criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

    def batches(self, epoch: int, generator: torch.Generator):
        order = torch.randperm(len(self.audio), generator=generator)
        for b in range(self.steps_per_epoch):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            batch = [self.audio[i] for i in idx.tolist()]
            if self.args.augment:
                waves = augment_waveforms(batch, self.clip_samples, self.args, generator)
            else:
                waves = fixed_windows(batch, self.clip_samples)
            yield waves, self.targets[idx], generator

    def loss(self, batch):
        waves, y, generator = batch
        device = self.runtime.device
        # The front end stays in float32 (log of small powers is not a bf16 job); the CNN runs
        # under autocast on GPU.
        feats = self.model.frontend(waves.to(device, non_blocking=True))
        y = y.to(device, non_blocking=True)
        if self.args.augment:
            a = self.args
            feats = warp_mel_axis(feats, a.vtlp_min, a.vtlp_max, generator)
            feats = spec_augment(feats, a.freq_masks, a.freq_mask_bins, a.time_masks, a.time_mask_fraction, generator)
        if self.args.augment and self.args.mixup_alpha > 0:
            # mixup: each example blended with another of the batch, the loss with both targets
            lam = float(np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
                        .beta(self.args.mixup_alpha, self.args.mixup_alpha))
            partner = torch.randperm(len(y), generator=generator).to(device)
            with self.runtime.autocast():
                logits = self.model.classify(lam * feats + (1 - lam) * feats[partner]).float()
            return lam * self.criterion(logits, y) + (1 - lam) * self.criterion(logits, y[partner]), len(y)
        with self.runtime.autocast():
            logits = self.model.classify(feats)
        return self.criterion(logits.float(), y), len(y)

    def validate(self) -> dict[str, float]:
        """On the clips as they are (no augmentation, natural length)."""
        logits = predict(self.model, self.val_audio, self.runtime.device, self.args.batch_size, self.runtime)
        loss = float(nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(self.val_targets)))
        summary = summarise(self.val_targets, logits.argmax(1), self.model.config.labels)
        return {"val_loss": loss, "val_accuracy": summary["accuracy"], "val_macro_f1": summary["macro_f1"]}


def train_plan(recipe: KeywordRecipe, args: TrainingArguments) -> Plan:
    return plan(epochs=args.epochs, epochs_given="epochs" in args.given, steps_per_epoch=recipe.steps_per_epoch,
                batch_size=recipe.batch_size, patience=args.patience, min_delta=args.min_delta,
                min_steps=args.min_steps, max_grad_norm=args.max_grad_norm, keep=args.keep)


def train(model: KeywordCNN, train_clips: list[Clip], val_clips: list[Clip], clip_samples: int,
          args: TrainingArguments, runtime: Runtime, checkpoint_dir: Path, fingerprint: str) -> tuple[TrainState, Plan]:
    """Train `model` in place; on return it holds the weights `args.keep` names (the final ones by default)."""
    recipe = KeywordRecipe(model, train_clips, val_clips, clip_samples, args, runtime)
    run = train_plan(recipe, args)
    model.to(runtime.device)
    optimizer = adamw(model, args.learning_rate, args.weight_decay)
    state = fit(model, recipe, optimizer, cosine_schedule(args.learning_rate, args.warmup_fraction, run.total_steps),
                run, runtime, Checkpoint(checkpoint_dir / CHECKPOINT_NAME, fingerprint), args.seed)
    return state, run
