"""Fine-tuning a Hugging Face audio classifier, step by step (the method section of a report):

1. Read the paths (SM_* variables) and the hyperparameters (strings, parsed to their types).
2. Check the base model directory is data only (no custom code, no pickles), then read its
   feature extractor: its sampling rate is the rate every clip is resampled to.
3. Read dataset.csv (and the validation channel's) and decode every clip once into memory (or take
   it from the feature cache of the model's earlier jobs).
4. Split: honour the `split` column / validation channel, otherwise stratify with a fixed seed.
5. Load the base with a classification head sized to the job's labels; freeze the feature encoder.
6. Fine-tune on length-bucketed batches with early stopping on validation loss and a checkpoint
   every epoch.
7. Evaluate the weights kept (the best validation epoch's unless keep=last) on the test split
   (validation if none) and plot.
8. Save a standard transformers directory (safetensors, feature extractor, labels, card, plots)
   and prove it: transformers.pipeline loads it and agrees with the trained model.

Any failure writes a one-paragraph reason to $SM_OUTPUT_DIR/failure and exits non-zero.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import random
import time
from pathlib import Path

import numpy as np

from trainer_core.args import Paths
from trainer_core.contract import run_main
from trainer_core.errors import TrainerError
from trainer_core.progress import log

from . import METHOD


def _fingerprint(args, splits, base) -> str:
    """What a checkpoint must match to be resumed: data, splits, labels, hyperparameters, base."""
    h = hashlib.sha256()
    h.update(json.dumps(args.to_dict(), sort_keys=True).encode())
    h.update(json.dumps(splits.labels).encode())
    for name in ("train", "validation"):
        for c in getattr(splits, name):
            h.update(f"{name}|{c.source}|{c.path}|{c.label}|{len(c.audio)}\n".encode())
    h.update(json.dumps(base.raw_config, sort_keys=True).encode())
    for weights in sorted(base.directory.glob("*.safetensors")):
        h.update(f"{weights.name}|{weights.stat().st_size}\n".encode())
    return h.hexdigest()


def verify_with_pipeline(model, model_dir: Path, clips: list[np.ndarray], rate: int, labels: list[str]) -> float:
    """Load the saved directory the way a user will (transformers.pipeline, nothing of ours) and
    check it names the job's labels and scores clips as the trained model does.
    Returns the largest probability difference."""
    import torch
    from transformers import pipeline

    classify = pipeline("audio-classification", model=str(model_dir), device=-1)
    if [classify.model.config.id2label[i] for i in range(len(labels))] != labels:
        raise TrainerError("The saved model's id2label does not list the job's labels in order; it was not stored.")
    model = model.to("cpu").eval()
    accepted = set(inspect.signature(model.forward).parameters)
    worst = 0.0
    for clip in clips:
        got = {r["label"]: r["score"] for r in classify({"raw": clip, "sampling_rate": rate}, top_k=len(labels))}
        inputs = classify.feature_extractor(clip, sampling_rate=rate, return_tensors="pt")
        with torch.no_grad():
            probs = model(**{k: v for k, v in inputs.items() if k in accepted}).logits.softmax(-1)[0].numpy()
        worst = max(worst, max(abs(got[label] - float(probs[i])) for i, label in enumerate(labels)))
    if worst > 1e-3:
        raise TrainerError(f"The saved model, loaded with transformers.pipeline, scores clips differently from the "
                           f"trained model (largest probability difference {worst:.3g}); it was not stored.")
    log(f"transformers.pipeline('audio-classification') loads {model_dir.name}/ and agrees (max |dp| {worst:.1e})")
    return worst


def run(paths: Paths) -> dict:
    import torch  # imported here so argument errors are reported before torch's import cost

    from audio_trainer.data import make_splits
    from audio_trainer.evaluate import held_out_report
    from audio_trainer.export import copy_plots
    from trainer_core.audio import load_job_data
    from trainer_core.fit import Runtime

    from .args import parse_hyperparameters
    from .base import inspect_base, load_feature_extractor, load_model
    from .card import write_card
    from .data import Collator
    from .loop import freeze, predict, train

    started = time.monotonic()
    # 1. Arguments and the machine.
    args = parse_hyperparameters(paths)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    runtime = Runtime.choose(args.mixed_precision, paths.num_gpus, paths.num_cpus)
    job = paths.job()

    # 2. The base model: refused before anything is loaded if it would run code.
    if paths.base_model_dir is None:
        raise TrainerError("Hugging Face fine-tuning needs a base model in the model channel.")
    base = inspect_base(paths.base_model_dir)
    feature_extractor = load_feature_extractor(base)
    rate = int(getattr(feature_extractor, "sampling_rate", 0) or 0)
    if rate <= 0:
        raise TrainerError("The base model's feature extractor has no sampling_rate.")

    # 3. The data, decoded once at the model's rate.
    clips = load_job_data(paths, "label", rate)

    # 4. Splits (the CNN trainer's rules; a classifier base keeps its label order).
    splits = make_splits(clips, args.validation_fraction, args.test_fraction, args.seed, base_labels=base.labels)
    for note in splits.notes:
        log(note)
    log(f"splits: {splits.sizes()}, labels: {splits.labels}")

    # 5. The model: base weights, a head for these labels, the feature encoder frozen.
    model = load_model(base, splits.labels)
    freeze(model, args)
    collator = Collator(feature_extractor, model)

    # 6. Fine-tuning.
    state, run_plan = train(model, collator, splits.train, splits.validation, splits.labels, args, runtime,
                            paths.checkpoint_dir, _fingerprint(args, splits, base))
    splits.notes += run_plan.notes
    train_seconds = time.monotonic() - started

    # 7. Evaluation on held-out data.
    eval_clips = splits.test if splits.eval_split == "test" else splits.validation
    logits = predict(model, collator, [c.audio for c in eval_clips], runtime, args.batch_size,
                     int(args.max_eval_length_seconds * rate))
    metrics, plots = held_out_report(splits, state, eval_clips, logits, paths.output_data_dir)
    metrics.update({
        "base_model": True,
        "method": METHOD,
        "base_model_type": base.raw_config.get("model_type"),
        "sampling_rate": rate,
    })

    # 7b. Learning curve: the same recipe from the same base on subsets of the training split.
    if args.learning_curve:
        from audio_trainer.evaluate import subset_scores
        from trainer_core.learning_curve import parse_fractions, run_learning_curve

        def train_and_score(subset, tag):
            torch.manual_seed(args.seed)
            sub_model = load_model(base, splits.labels)
            freeze(sub_model, args)
            sub_splits = dataclasses.replace(splits, train=subset)
            sub_state, _ = train(sub_model, collator, subset, splits.validation, splits.labels, args, runtime,
                                 paths.checkpoint_dir / tag, _fingerprint(args, sub_splits, base) + tag)
            sub_logits = predict(sub_model, collator, [c.audio for c in eval_clips], runtime, args.batch_size,
                                 int(args.max_eval_length_seconds * rate))
            return subset_scores(splits.labels, eval_clips, sub_logits, sub_state)

        plots.append(paths.output_data_dir / "learning_curve.png")
        metrics["learning_curve"] = run_learning_curve(
            train_clips=splits.train, full_point=metrics, fractions=parse_fractions(args.learning_curve_fractions),
            metric=args.learning_curve_metric, target=args.target_metric or None, seed=args.seed,
            eval_split=splits.eval_split, eval_size=len(eval_clips), train_and_score=train_and_score,
            plot_path=plots[-1], full_stopped_early=state.stop_reason.startswith("early stop"))

    # 8. The artifact: a transformers directory, proven loadable by transformers alone.
    model_dir = paths.model_dir
    model_dir.mkdir(parents=True, exist_ok=True)
    lineage = list(base.raw_config.get("retrain_lineage") or [{
        "base": "uploaded model",
        "model_type": base.raw_config.get("model_type"),
        "architectures": ",".join(base.raw_config.get("architectures") or []),
        "name_or_path": base.raw_config.get("_name_or_path"),
    }])
    lineage.append({
        "job_id": job.get("job_id"),
        "model_name": job.get("model_name"),
        "base": job.get("base") or ("stored version" if base.raw_config.get("retrain_lineage") else "uploaded model"),
        "method": METHOD,
        "labels": splits.labels,
        "train_size": len(splits.train),
    })
    model.config.retrain_lineage = lineage  # travels in config.json, so the next retraining extends it
    model.to("cpu").save_pretrained(str(model_dir), safe_serialization=True)
    feature_extractor.save_pretrained(str(model_dir))
    (model_dir / "labels.json").write_text(json.dumps(splits.labels))
    check = [c.audio[: int(args.max_eval_length_seconds * rate)] for c in (eval_clips or splits.validation)][:4]
    metrics["pipeline_max_abs_prob_diff"] = verify_with_pipeline(model, model_dir, check, rate, splits.labels)
    metrics["training_seconds"] = round(train_seconds, 1)
    (paths.output_data_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    copy_plots(plots, model_dir)
    write_card(model_dir, job=job, base=base.raw_config, labels=splits.labels, label_counts=metrics["label_counts"],
               hyperparameters=args.to_dict(), metrics=metrics, lineage=lineage, notes=splits.notes)
    log(f"done in {time.monotonic() - started:.1f}s: {sorted(p.name for p in model_dir.iterdir())}")
    return metrics


def main() -> int:
    return run_main(run, "fine-tuning", memory_hint="use a smaller batch_size with gradient_accumulation_steps")


__all__ = ["main", "run"]
