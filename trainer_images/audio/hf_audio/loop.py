"""Fine-tuning: AdamW with linear warm-up and linear decay, gradient accumulation, mixed
precision on GPU, length-bucketed batches, early stopping on validation loss, a checkpoint after
every epoch so a rerun of a killed job resumes where it stopped.

Checkpoints hold only tensors and plain containers and are read back with
`torch.load(weights_only=True)`; one is resumed only when its fingerprint (data, labels,
hyperparameters, base model) matches this job.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from audio_trainer.data import Clip
from audio_trainer.evaluate import summarise
from audio_trainer.loop import Runtime, TrainState
from audio_trainer.progress import emit_progress, log

from .args import FineTuningArguments
from .data import Collator, length_buckets

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


def _optimizer(model, args: FineTuningArguments) -> torch.optim.Optimizer:
    # No weight decay on biases and norms, as in transformers.Trainer.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate,
    )


def _lr_at(step: int, total: int, args: FineTuningArguments) -> float:
    """Linear warm-up to the peak, then linear decay to zero (transformers' default schedule)."""
    warmup = int(math.ceil(args.warmup_ratio * total))
    if step < warmup:
        return args.learning_rate * (step + 1) / warmup
    return args.learning_rate * max(0.0, (total - step) / max(1, total - warmup))


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
    order = sorted(range(len(waves)), key=lambda i: len(waves[i]))
    out = np.zeros((len(waves), model.config.num_labels), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        inputs = collator([crop(waves[i], max_samples, None) for i in idx])
        with runtime.autocast():
            logits = model(**{k: v.to(runtime.device) for k, v in inputs.items()}).logits
        out[idx] = logits.float().cpu().numpy()
    model.train(was_training)
    return out


def _save(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # atomic: a kill mid-write leaves the previous checkpoint intact


def _load_checkpoint(path: Path, fingerprint: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a torn or foreign file is not fatal: retrain
        log(f"ignoring unreadable checkpoint {path.name}: {e}")
        return None
    if not isinstance(payload, dict) or payload.get("fingerprint") != fingerprint:
        log(f"ignoring checkpoint {path.name}: it was written for different data, hyperparameters or base")
        return None
    return payload


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def train(model, collator: Collator, train_clips: list[Clip], val_clips: list[Clip], labels: list[str],
          args: FineTuningArguments, runtime: Runtime, checkpoint_dir: Path, fingerprint: str) -> TrainState:
    """Fine-tune `model` in place; on return it holds the weights of the best validation loss."""
    device = runtime.device
    model.to(device)
    index = {label: i for i, label in enumerate(labels)}
    audio = [c.audio for c in train_clips]
    targets = torch.tensor([index[c.label] for c in train_clips])
    val_targets = np.array([index[c.label] for c in val_clips])
    max_samples = int(args.max_length_seconds * collator.rate)
    max_eval_samples = int(args.max_eval_length_seconds * collator.rate)
    lengths = [min(len(a), max_samples) for a in audio]

    optimizer = _optimizer(model, args)
    scaler = torch.amp.GradScaler(device.type, enabled=runtime.amp_dtype == torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    batch_size = min(args.batch_size, len(train_clips))
    batches_per_epoch = math.ceil(len(train_clips) / batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    total_steps = steps_per_epoch * args.epochs
    log(f"{batches_per_epoch} batches of {batch_size} per epoch, an optimizer step every "
        f"{args.gradient_accumulation_steps}: {steps_per_epoch} steps per epoch, {total_steps} at most")

    state = TrainState()
    best_weights = _cpu_state(model)
    ckpt_path = checkpoint_dir / CHECKPOINT_NAME
    payload = _load_checkpoint(ckpt_path, fingerprint)
    if payload is not None:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        if payload.get("scaler"):
            scaler.load_state_dict(payload["scaler"])
        state = TrainState(**payload["state"])
        best_weights = payload["best_model"] or _cpu_state(model)
        log(f"resumed from checkpoint after epoch {state.epoch} (best epoch so far: {state.best_epoch})")

    while not state.finished and state.epoch < args.epochs:
        epoch = state.epoch + 1
        # One generator per epoch, seeded from (seed, epoch): batches and crops are the same
        # whether or not the run was interrupted before this epoch.
        gen = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
        batches = length_buckets(lengths, batch_size, args.bucket_batches, gen)
        model.train()
        total_loss, seen, padded, real = 0.0, 0, 0, 0
        optimizer.zero_grad(set_to_none=True)
        for b, idx in enumerate(batches):
            waves = [crop(audio[i], max_samples, gen) for i in idx]
            padded += max(len(w) for w in waves) * len(waves)
            real += sum(len(w) for w in waves)
            inputs = {k: v.to(device, non_blocking=True) for k, v in collator(waves).items()}
            y = targets[idx].to(device, non_blocking=True)
            with runtime.autocast():
                logits = model(**inputs).logits
            loss = criterion(logits.float(), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the training loss became {loss.item()} at epoch {epoch}; lower learning_rate")
            # Scale so that an accumulated step averages over clips like one big batch would.
            scaler.scale(loss * len(idx) / (batch_size * args.gradient_accumulation_steps)).backward()
            total_loss += loss.item() * len(idx)
            seen += len(idx)
            if (b + 1) % args.gradient_accumulation_steps == 0 or b + 1 == len(batches):
                for group in optimizer.param_groups:
                    group["lr"] = _lr_at(state.step, total_steps, args)
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1

        # Validation on whole clips (truncated only beyond max_eval_length_seconds).
        val_logits = predict(model, collator, [c.audio for c in val_clips], runtime, batch_size, max_eval_samples)
        val_loss = float(nn.functional.cross_entropy(torch.from_numpy(val_logits), torch.from_numpy(val_targets)))
        summary = summarise(val_targets, val_logits.argmax(1), labels)
        metrics = {
            "train_loss": total_loss / max(1, seen),
            "val_loss": val_loss,
            "val_accuracy": summary["accuracy"],
            "val_macro_f1": summary["macro_f1"],
            "learning_rate": optimizer.param_groups[0]["lr"],
            "padding_fraction": 1 - real / max(1, padded),
        }
        state.epoch = epoch
        state.history.append({"epoch": epoch, **metrics})

        improved = val_loss < state.best_val_loss - args.min_delta
        if improved:
            state.best_val_loss, state.best_epoch, state.bad_epochs = val_loss, epoch, 0
            best_weights = _cpu_state(model)
        else:
            state.bad_epochs += 1
        if state.bad_epochs >= args.patience:
            state.finished = True
            state.stop_reason = f"early stop: no validation-loss improvement for {args.patience} epochs"
        elif epoch >= args.epochs:
            state.finished = True
            state.stop_reason = f"reached epochs={args.epochs}"

        _save(ckpt_path, {
            "fingerprint": fingerprint,
            "model": _cpu_state(model),
            # The best weights are this epoch's more often than not: then they are not stored twice.
            "best_model": {} if improved else best_weights,
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "state": asdict(state),
        })
        emit_progress(epoch, args.epochs, state.step, metrics)
        log(f"epoch {epoch}/{args.epochs}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    if state.stop_reason:
        log(state.stop_reason + f"; best epoch {state.best_epoch} (val_loss {state.best_val_loss:.4f})")
    model.load_state_dict(best_weights)
    model.eval()
    return state
