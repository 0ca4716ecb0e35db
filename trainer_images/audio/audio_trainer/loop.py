"""Training: AdamW with a warm-up + cosine schedule, early stopping on validation loss, the best
weights kept, and a checkpoint after every epoch so a rerun of a killed job resumes.

Checkpoints hold only tensors and plain containers and are read back with
`torch.load(weights_only=True)`: no pickled code is ever executed. A checkpoint is only resumed
when its fingerprint (data, labels, hyperparameters, base model) matches this job; otherwise it
belongs to something else and training starts afresh.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .args import TrainingArguments
from .augment import augment_waveforms, fixed_windows, spec_augment
from .data import Clip
from .evaluate import predict, summarise
from .model import KeywordCNN
from .progress import emit_progress, log

CHECKPOINT_NAME = "audio-trainer-checkpoint.pt"


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    best_val_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    finished: bool = False
    stop_reason: str = ""
    history: list[dict] = field(default_factory=list)


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None: full precision

    @classmethod
    def choose(cls, args: TrainingArguments, num_gpus: int | None, num_cpus: int | None) -> Runtime:
        if torch.cuda.is_available() and num_gpus != 0:
            device = torch.device("cuda")
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            mode = args.mixed_precision
            if mode == "auto":
                mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
            log(f"device: {torch.cuda.get_device_name(0)}, mixed precision: {mode}")
            return cls(device, dtype)
        # Small convolutions on CPU: one thread per core, and no inter-op oversubscription.
        threads = num_cpus or len(os.sched_getaffinity(0)) or 1
        torch.set_num_threads(max(1, threads))
        with contextlib.suppress(RuntimeError):  # may only be set once per process
            torch.set_num_interop_threads(1)
        log(f"device: cpu, {torch.get_num_threads()} threads, full precision")
        return cls(torch.device("cpu"), None)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


def _lr_at(step: int, total: int, args: TrainingArguments) -> float:
    """Linear warm-up to the peak, then cosine decay to 1% of it."""
    warmup = max(1, int(args.warmup_fraction * total))
    if step < warmup:
        return args.learning_rate * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return args.learning_rate * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))


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
        log(f"ignoring checkpoint {path.name}: it was written for different data or hyperparameters")
        return None
    return payload


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def train(
    model: KeywordCNN,
    train_clips: list[Clip],
    val_clips: list[Clip],
    clip_samples: int,
    args: TrainingArguments,
    runtime: Runtime,
    checkpoint_dir: Path,
    fingerprint: str,
) -> TrainState:
    """Train `model` in place; on return it holds the best weights (lowest validation loss)."""
    device = runtime.device
    model.to(device)
    labels = model.config.labels
    index = {label: i for i, label in enumerate(labels)}
    audio = [c.audio for c in train_clips]
    targets = torch.tensor([index[c.label] for c in train_clips])
    val_targets = np.array([index[c.label] for c in val_clips])

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=runtime.amp_dtype == torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    batch_size = min(args.batch_size, len(train_clips))
    steps_per_epoch = max(1, len(train_clips) // batch_size)  # the ragged tail is dropped: BatchNorm dislikes tiny batches
    total_steps = steps_per_epoch * args.epochs

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
        best_weights = payload["best_model"]
        log(f"resumed from checkpoint after epoch {state.epoch} (best epoch so far: {state.best_epoch})")

    while not state.finished and state.epoch < args.epochs:
        epoch = state.epoch + 1
        # One generator per epoch, seeded from (seed, epoch): shuffling and augmentation are the
        # same whether or not the run was interrupted before this epoch.
        gen = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
        order = torch.randperm(len(train_clips), generator=gen)
        model.train()
        total_loss, seen = 0.0, 0
        for b in range(steps_per_epoch):
            idx = order[b * batch_size : (b + 1) * batch_size]
            batch = [audio[i] for i in idx.tolist()]
            if args.augment:
                waves = augment_waveforms(batch, clip_samples, args, gen)
            else:
                waves = fixed_windows(batch, clip_samples)
            y = targets[idx].to(device, non_blocking=True)
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(state.step, total_steps, args)
            # The front end stays in float32 (log of small powers is not a bf16 job); the CNN
            # runs under autocast on GPU.
            feats = model.frontend(waves.to(device, non_blocking=True))
            if args.augment:
                feats = spec_augment(feats, args, gen)
            with runtime.autocast():
                logits = model.classify(feats)
            loss = criterion(logits.float(), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the training loss became {loss.item()} at epoch {epoch}; lower learning_rate")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            scaler.step(optimizer)
            scaler.update()
            state.step += 1
            total_loss += loss.item() * len(idx)
            seen += len(idx)

        # Validation on the clips as they are (no augmentation, natural length).
        val_logits = predict(model, [c.audio for c in val_clips], device, args.batch_size, runtime)
        val_loss = float(nn.functional.cross_entropy(torch.from_numpy(val_logits), torch.from_numpy(val_targets)))
        summary = summarise(val_targets, val_logits.argmax(1), labels)
        metrics = {
            "train_loss": total_loss / max(1, seen),
            "val_loss": val_loss,
            "val_accuracy": summary["accuracy"],
            "val_macro_f1": summary["macro_f1"],
            "learning_rate": optimizer.param_groups[0]["lr"],
        }
        state.epoch = epoch
        state.history.append({"epoch": epoch, **metrics})

        # Early stopping on validation loss: it keeps improving after accuracy saturates on a
        # small validation split, so it picks better-calibrated weights than accuracy would.
        if val_loss < state.best_val_loss - args.min_delta:
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
            "best_model": best_weights,
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
