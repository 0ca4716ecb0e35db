"""The job, step by step (this reads as the method section of a report):

1. Read the paths (SM_* variables) and the hyperparameters (strings, parsed to their types).
2. Load the base model, if the model channel holds one, to know its labels and architecture.
3. Read dataset.csv (and the validation channel's), decode every clip to 16 kHz mono in memory
   (a clip the feature cache of the model's earlier jobs holds is not decoded again).
4. Split: honour the `split` column / validation channel, otherwise stratify with a fixed seed.
5. Build the model (from the base config when continuing) and copy the base weights in.
6. Train with augmentation through the whole schedule (or, with keep=best, early stopping on
   validation, never before min_steps optimizer steps), a checkpoint every epoch (trainer_core/fit.py).
7. Evaluate the weights kept (the final ones; keep=best: the best validation epoch's) on the test
   split (validation if none) and plot.
   With `learning_curve=true`, train the same recipe on stratified 25% and 50% subsets of the
   training split, fit a saturating curve and extrapolate to more data (learning_curve.py).
8. Export model.onnx (verified against torch), weights, config, labels and the model card.

Any failure writes a one-paragraph reason to $SM_OUTPUT_DIR/failure and exits non-zero.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time

import numpy as np

from trainer_core.args import Paths
from trainer_core.contract import run_main
from trainer_core.progress import log

from . import FORMAT, SAMPLE_RATE
from .args import TrainingArguments, parse_hyperparameters


def _fingerprint(args: TrainingArguments, splits, base) -> str:
    """What a checkpoint must match to be resumed: the data, its splits, labels, hyperparameters, base."""
    h = hashlib.sha256()
    h.update(json.dumps(args.to_dict(), sort_keys=True).encode())
    h.update(json.dumps(splits.labels).encode())
    for name in ("train", "validation"):
        for c in getattr(splits, name):
            h.update(f"{name}|{c.source}|{c.path}|{c.label}|{len(c.audio)}\n".encode())
    if base is not None:
        h.update(json.dumps(base.raw_config, sort_keys=True).encode())
    return h.hexdigest()


def run(paths: Paths) -> dict:
    import torch  # imported here so argument errors are reported before torch's import cost

    from trainer_core.audio import load_job_data
    from trainer_core.fit import Runtime

    from .base import initialise_from_base, load_base
    from .data import make_splits
    from .evaluate import held_out_report, predict
    from .export import copy_plots, export_onnx, save_weights, write_card
    from .loop import train
    from .model import KeywordCNN, ModelConfig

    started = time.monotonic()
    # 1. Arguments and the machine.
    args = parse_hyperparameters(paths)
    if args.learning_curve:
        from trainer_core.learning_curve import parse_fractions

        fractions = parse_fractions(args.learning_curve_fractions)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    runtime = Runtime.choose(args.mixed_precision, paths.num_gpus, paths.num_cpus)
    job = paths.job()

    # 2. The base model, if any: only this trainer's own format.
    base = None
    if paths.base_model_dir is not None:
        base = load_base(paths.base_model_dir)

    # 3. The data, decoded once.
    clips = load_job_data(paths, "label")

    # 4. Splits.
    splits = make_splits(clips, args.validation_fraction, args.test_fraction, args.seed,
                         base_labels=base.config.labels if base else None)
    for note in splits.notes:
        log(note)
    log(f"splits: {splits.sizes()}, labels: {splits.labels}")

    # 5. The model.
    if base is not None:
        arch = base.config
        for hp, value in (("n_mels", arch.n_mels), ("channels", arch.channels), ("dropout", arch.dropout),
                          ("feature_norm", arch.feature_norm), ("architecture", arch.architecture)):
            if getattr(args, hp) != value and not (hp == "channels" and args.channel_list == value):
                log(f"continuing from a base: its {hp}={value} is kept (hyperparameter {hp}={getattr(args, hp)} ignored)")
        config = ModelConfig(splits.labels, arch.n_mels, arch.n_fft, arch.hop_length, list(arch.channels), arch.dropout,
                             feature_norm=arch.feature_norm, architecture=arch.architecture)
    else:
        config = ModelConfig(splits.labels, args.n_mels, args.n_fft, args.hop_length, args.channel_list, args.dropout,
                             feature_norm=args.feature_norm, architecture=args.architecture)
    model = KeywordCNN(config)
    if base is not None:
        initialise_from_base(model, base)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: log-mel({config.n_mels}) + {config.architecture}{config.channels}, {n_params:,} parameters")

    # Training crop: long enough for the longest clip even when slowed down by augmentation.
    if args.clip_seconds > 0:
        clip_samples = int(args.clip_seconds * SAMPLE_RATE)
    else:
        longest = max(len(c.audio) for c in splits.train)
        clip_samples = int(min(4 * SAMPLE_RATE, max(0.5 * SAMPLE_RATE, longest / min(1.0, args.speed_min))))
    log(f"training window: {clip_samples / SAMPLE_RATE:.2f} s")

    # 6. Training.
    state, run_plan = train(model, splits.train, splits.validation, clip_samples, args, runtime,
                            paths.checkpoint_dir, _fingerprint(args, splits, base))
    splits.notes += run_plan.notes
    train_seconds = time.monotonic() - started

    # 7. Evaluation on held-out data.
    model.to("cpu")
    eval_clips = splits.test if splits.eval_split == "test" else splits.validation
    logits = predict(model, [c.audio for c in eval_clips], torch.device("cpu"), args.batch_size)
    metrics, plots = held_out_report(splits, state, eval_clips, logits, paths.output_data_dir)
    metrics["base_model"] = bool(base)

    # 7b. Learning curve: the same recipe (seed, splits, epochs, early stopping, starting point) on
    # subsets of the training split; each subset has its own checkpoint folder, so a rerun resumes.
    if args.learning_curve:
        from .evaluate import subset_scores
        from trainer_core.learning_curve import run_learning_curve

        def train_and_score(subset, tag):
            random.seed(args.seed)
            np.random.seed(args.seed)
            torch.manual_seed(args.seed)
            sub_model = KeywordCNN(config)
            if base is not None:
                initialise_from_base(sub_model, base)
            sub_splits = dataclasses.replace(splits, train=subset)
            sub_state, _ = train(sub_model, subset, splits.validation, clip_samples, args, runtime,
                                 paths.checkpoint_dir / tag, _fingerprint(args, sub_splits, base) + tag)
            sub_model.to("cpu")
            sub_logits = predict(sub_model, [c.audio for c in eval_clips], torch.device("cpu"), args.batch_size)
            return subset_scores(splits.labels, eval_clips, sub_logits, sub_state)

        plots.append(paths.output_data_dir / "learning_curve.png")
        metrics["learning_curve"] = run_learning_curve(
            train_clips=splits.train, full_point=metrics, fractions=fractions, metric=args.learning_curve_metric,
            target=args.target_metric or None, seed=args.seed, eval_split=splits.eval_split, eval_size=len(eval_clips),
            train_and_score=train_and_score, plot_path=plots[-1],
            full_stopped_early=state.stop_reason.startswith("early stop"))

    # 8. Export.
    model_dir = paths.model_dir
    model_dir.mkdir(parents=True, exist_ok=True)
    lineage = list(base.raw_config.get("lineage", [])) if base else []
    lineage.append({
        "job_id": job.get("job_id"),
        "model_name": job.get("model_name"),
        "base": job.get("base") or ("uploaded model" if base else None),
        "labels": splits.labels,
        "train_size": len(splits.train),
    })
    save_weights(model, model_dir, {"lineage": lineage, "trained_from": base.raw_config.get("lineage", [])[-1:] if base else []})
    check = [c.audio for c in (eval_clips or splits.validation)][:8]
    metrics["onnx_max_abs_diff"] = export_onnx(model, model_dir / "model.onnx", check)
    metrics["training_seconds"] = round(train_seconds, 1)
    (paths.output_data_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    copy_plots(plots, model_dir)
    write_card(model_dir, job=job, labels=splits.labels, label_counts=metrics["label_counts"], hyperparameters=args.to_dict(),
               metrics=metrics, lineage=lineage, notes=splits.notes, config=config.to_json())
    log(f"done in {time.monotonic() - started:.1f}s: {sorted(p.name for p in model_dir.iterdir())}")
    return metrics


def main() -> int:
    return run_main(run, "training")


__all__ = ["FORMAT", "main", "run"]
