"""One fit driver for every trainer of the audio image: the keyword CNN (audio_trainer), Hugging
Face fine-tuning (hf_audio) and CTC speech recognition (speech.asr).

A trainer says what is particular to it in a `Recipe` (its batches, the loss of one batch, its
validation figures and which of them choose the best epoch); the driver does the rest, the same
for all: AdamW steps with gradient accumulation, clipping and mixed precision, the learning-rate
schedule, the untrained model's validation figures (the baseline training must beat), early
stopping that never ends a run before `min_steps` optimizer steps, the best weights kept (or,
with `keep="last"`, the whole schedule run and its final weights kept), a checkpoint after every
epoch so that a rerun of a killed job resumes, and progress.

Checkpoints hold only tensors and plain containers and are read back with
`torch.load(weights_only=True)`: no pickled code is ever executed. One is resumed only when its
fingerprint (data, labels, hyperparameters, base model) matches this job; otherwise it belongs
to something else and training starts afresh.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import TrainerError
from .progress import emit_progress, log


@dataclass
class Runtime:
    """Where the model runs: the GPU with mixed precision when there is one, else every CPU core."""

    device: torch.device
    amp_dtype: torch.dtype | None  # None: full precision

    @classmethod
    def choose(cls, mixed_precision: str, num_gpus: int | None, num_cpus: int | None) -> Runtime:
        if torch.cuda.is_available() and num_gpus != 0:
            device = torch.device("cuda")
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            mode = mixed_precision
            if mode == "auto":
                mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
            log(f"device: {torch.cuda.get_device_name(0)}, mixed precision: {mode}")
            return cls(device, dtype)
        # Small models on CPU: one thread per core, and no inter-op oversubscription.
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


@dataclass
class Plan:
    """How long and how a run trains. `epochs` is the run's length after `plan()` has applied the
    minimum number of optimizer steps; `requested_epochs` what the hyperparameters said."""

    epochs: int
    steps_per_epoch: int
    batch_size: int  # the nominal batch: a batch's loss weighs len(batch) / (batch_size * accumulation)
    patience: int
    min_delta: float
    min_steps: int
    max_grad_norm: float
    accumulation: int = 1
    requested_epochs: int = 0
    notes: list[str] = field(default_factory=list)
    # "best": the best validation epoch's weights, early stopping on. "last": every epoch of the
    # schedule, then its final weights: for a validation split that saturates (a keyword set's
    # validation clips come from the training speakers, so its best epoch is noise; the end of a
    # cosine schedule generalises better to speakers never heard: bench/README.md, KWS out of domain).
    keep: str = "best"

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


def plan(*, epochs: int, epochs_given: bool, steps_per_epoch: int, batch_size: int, patience: int, min_delta: float,
         min_steps: int, max_grad_norm: float, accumulation: int = 1, keep: str = "best") -> Plan:
    """The run's length. A small data set makes few optimizer steps per epoch, and a model stopped
    after a few dozen steps has learned nothing (seen: 60 clips, early stopping at epoch 9, test
    accuracy at chance). So early stopping waits for `min_steps` steps, and the default number of
    epochs grows until the run makes them. Epochs the user set are kept: the note says what that costs."""
    steps_per_epoch = max(1, steps_per_epoch)
    needed = math.ceil(min_steps / steps_per_epoch)
    notes = []
    run_epochs = epochs
    if needed > epochs:
        if epochs_given:
            notes.append(f"epochs={epochs} gives only {epochs * steps_per_epoch} optimizer steps, fewer than "
                         f"min_steps={min_steps}: the model may not have learned what it could")
        else:
            run_epochs = needed
            notes.append(f"{steps_per_epoch} optimizer steps per epoch: the run was lengthened from {epochs} to "
                         f"{needed} epochs to make min_steps={min_steps} steps")
    return Plan(run_epochs, steps_per_epoch, batch_size, patience, min_delta, min_steps, max_grad_norm, accumulation,
                requested_epochs=epochs, notes=notes, keep=keep)


def linear_schedule(peak: float, warmup_fraction: float, total: int) -> Callable[[int], float]:
    """Linear warm-up to the peak, then linear decay to zero (transformers' default schedule)."""
    warmup = max(1, math.ceil(warmup_fraction * total))

    def lr_at(step: int) -> float:
        if step < warmup:
            return peak * (step + 1) / warmup
        return peak * max(0.0, (total - step) / max(1, total - warmup))
    return lr_at


def cosine_schedule(peak: float, warmup_fraction: float, total: int, floor: float = 0.01) -> Callable[[int], float]:
    """Linear warm-up to the peak, then cosine decay to `floor` times the peak."""
    warmup = max(1, int(warmup_fraction * total))

    def lr_at(step: int) -> float:
        if step < warmup:
            return peak * (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
    return lr_at


def adamw(model: nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the weights that train; no weight decay on biases and norms (as transformers.Trainer)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=learning_rate)


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    best: list[float] | None = None  # the score of the best epoch (Recipe.score)
    best_epoch: int = 0
    kept_epoch: int = 0  # the epoch whose weights the model holds when fit() returns (Plan.keep)
    bad_epochs: int = 0
    finished: bool = False
    stop_reason: str = ""
    history: list[dict] = field(default_factory=list)  # one record per epoch: train and validation figures
    initial: dict = field(default_factory=dict)  # validation figures of the model before training

    def best_record(self) -> dict:
        return next((h for h in self.history if h["epoch"] == self.best_epoch), {})


class Recipe:
    """What a trainer tells the fit driver. `score` orders validation figures, lower is better,
    compared element by element (the later ones break ties)."""

    def batches(self, epoch: int, generator: torch.Generator) -> Iterable[Any]:
        raise NotImplementedError

    def loss(self, batch: Any) -> tuple[torch.Tensor, int]:
        """The mean loss of one training batch (under autocast where the model allows) and its size."""
        raise NotImplementedError

    def validate(self) -> dict[str, float]:
        raise NotImplementedError

    def score(self, figures: dict[str, float]) -> tuple[float, ...]:
        return (figures["val_loss"],)

    def epoch_figures(self) -> dict[str, float]:
        """Figures of the epoch just trained that the trainer measures itself (padding, say)."""
        return {}


def better(new: tuple[float, ...], best: tuple[float, ...] | None, delta: float) -> bool:
    """Lexicographic comparison with a tolerance; a non-finite figure is never better."""
    if best is None:
        return True
    for a, b in zip(new, best):
        a = a if math.isfinite(a) else math.inf
        b = b if math.isfinite(b) else math.inf
        if a < b - delta:
            return True
        if a > b + delta:
            return False
    return False


class Checkpoint:
    """One file in $SM_CHECKPOINT_DIR, written atomically (a kill mid-write leaves the previous one)."""

    def __init__(self, path: Path, fingerprint: str):
        self.path = path
        self.fingerprint = fingerprint

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            payload = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a torn or foreign file is not fatal: retrain
            log(f"ignoring unreadable checkpoint {self.path.name}: {e}")
            return None
        if not isinstance(payload, dict) or payload.get("fingerprint") != self.fingerprint:
            log(f"ignoring checkpoint {self.path.name}: it was written for different data, hyperparameters or base")
            return None
        return payload

    def save(self, payload: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({"fingerprint": self.fingerprint, **payload}, tmp)
        os.replace(tmp, self.path)


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def fit(model: nn.Module, recipe: Recipe, optimizer: torch.optim.Optimizer, lr_at: Callable[[int], float],
        plan: Plan, runtime: Runtime, checkpoint: Checkpoint, seed: int) -> TrainState:
    """Train `model` in place; on return it holds the weights `plan.keep` names: the best validation
    epoch's, or the final ones."""
    model.to(runtime.device)
    params = [p for p in model.parameters() if p.requires_grad]
    # fp16 needs loss scaling against underflow; bf16 has float32's range and does not.
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp_dtype == torch.float16)

    state, best_weights = TrainState(), cpu_state(model)
    payload = checkpoint.load()
    if payload is not None:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        if payload.get("scaler"):
            scaler.load_state_dict(payload["scaler"])
        state = TrainState(**payload["state"])
        best_weights = payload["best_model"] or payload["model"]
        log(f"resumed from checkpoint after epoch {state.epoch} (best epoch so far: {state.best_epoch})")
    else:
        state.initial = recipe.validate()
        log("before training: " + _figures(state.initial))

    def step() -> None:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(state.step)
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(params, plan.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1

    while not state.finished and state.epoch < plan.epochs:
        epoch = state.epoch + 1
        started = time.monotonic()
        # One generator per epoch, seeded from (seed, epoch): batches and augmentation are the same
        # whether or not the run was interrupted before this epoch.
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        model.train()
        loss_sum, seen, pending = 0.0, 0, 0
        optimizer.zero_grad(set_to_none=True)

        for batch in recipe.batches(epoch, generator):  # made as they are used: an epoch is never all in memory
            loss, n = recipe.loss(batch)
            if not torch.isfinite(loss):
                raise TrainerError(f"The training loss became {loss.item()} at epoch {epoch}; lower learning_rate.")
            # A batch weighs by its size, so an accumulated step averages over clips as one big batch would.
            scaler.scale(loss * n / (plan.batch_size * plan.accumulation)).backward()
            loss_sum += loss.item() * n
            seen += n
            pending += 1
            if pending == plan.accumulation:
                step()
                pending = 0
        if pending:  # the epoch's last, partial accumulation
            step()

        figures = {"train_loss": loss_sum / max(1, seen), **recipe.validate(), **recipe.epoch_figures(),
                   "learning_rate": optimizer.param_groups[0]["lr"]}
        state.epoch = epoch
        state.history.append({"epoch": epoch, **figures, "seconds": round(time.monotonic() - started, 1)})
        score = recipe.score(figures)
        improved = better(score, tuple(state.best) if state.best else None, plan.min_delta)
        if improved:
            state.best, state.best_epoch, state.bad_epochs = list(score), epoch, 0
            best_weights = cpu_state(model)
        else:
            state.bad_epochs += 1
        if plan.keep == "best" and state.bad_epochs >= plan.patience and state.step >= plan.min_steps:
            state.finished = True
            state.stop_reason = f"early stop: no validation improvement for {state.bad_epochs} epochs"
        elif epoch >= plan.epochs:
            state.finished = True
            state.stop_reason = f"reached epochs={plan.epochs}"

        checkpoint.save({
            "model": best_weights if improved else cpu_state(model),
            "best_model": {} if improved else best_weights,  # the best are this epoch's more often than not
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "state": asdict(state),
        })
        emit_progress(epoch, plan.epochs, state.step, figures)
        log(f"epoch {epoch}/{plan.epochs}: {_figures(figures)}")

    if state.stop_reason:
        log(f"{state.stop_reason}; best epoch {state.best_epoch} ({_figures(state.best_record(), keys=('val_',))})")
    if plan.keep == "last":
        state.kept_epoch = state.epoch
        log(f"keeping the final weights (keep=last), of epoch {state.epoch}")
    else:
        state.kept_epoch = state.best_epoch
        model.load_state_dict(best_weights)
    model.eval()
    return state


def epochs_sentence(metrics: dict) -> str:
    """The model card's line on how long the run trained and whose weights the model holds."""
    run = f"{metrics['epochs_run']} epochs run ({metrics.get('stop_reason', '')})"
    best, kept = metrics["best_epoch"], metrics["kept_epoch"]
    if kept != best:
        return f"{run}; the model holds the final weights, of epoch {kept} (keep=last; the best validation epoch was {best})."
    if kept == metrics["epochs_run"]:
        return f"{run}; the model holds the weights of epoch {kept}, the final and the best validation epoch."
    return f"{run}; the model holds the weights of the best validation epoch, {best}."


def _figures(figures: dict, keys: tuple[str, ...] = ("",)) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in figures.items()
                     if isinstance(v, float) and k.startswith(keys))
