"""Task `asr`: a CTC speech recogniser, step by step:

1. Read the paths (SM_* variables) and the hyperparameters (strings, parsed to their types).
2. Read dataset.csv (`audio,text[,split]`, and the validation channel's), decode every file once to
   16 kHz mono (video files through ffmpeg), or take it from the feature cache of earlier jobs.
3. Split (asr_splits.py): honour the `split` column / validation channel, otherwise a seeded random
   split into train/validation/test. The test split never trains and never chooses an epoch.
4. Normalise the transcripts and build the character vocabulary from the training split; with a
   base model, merge it into the base's vocabulary (base ids kept, new characters appended).
5. The model (asr_model.py): the base (`AutoModelForCTC`, safetensors only, no remote code) with its
   output layer resized to the merged vocabulary, or a fresh small conformer on log-mel features
   (`Wav2Vec2BertForCTC`) sized for a CPU and a few hundred clips.
6. Train (ctc.py, on the shared fit driver): each epoch every clip at one of three speeds, and on
   log-mels a vocal-tract-length warp and SpecAugment; AdamW, linear warm-up and decay, length-bucketed
   batches, gradient accumulation and mixed precision on a GPU; WER/CER on validation every epoch;
   early stopping, never before min_steps optimizer steps; a checkpoint every epoch so a rerun resumes.
7. Evaluate the best weights on the test split (validation when there is none): WER, CER, examples;
   a model that transcribes (nearly) every held-out clip as nothing has collapsed to blanks: the
   run fails with that reason (or, with on_blank_collapse=warn, says so in its metrics and card).
8. Save model + processor with save_pretrained (safetensors), check that
   `transformers.pipeline("automatic-speech-recognition", model=DIR)` loads it, write the curves,
   the model card and metrics.json (asr_report.py).

Any failure writes a one-paragraph reason to $SM_OUTPUT_DIR/failure and exits non-zero.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from trainer_core.args import Paths, read_arguments
from trainer_core.audio import load_job_data
from trainer_core.contract import run_main
from trainer_core.errors import TrainerError
from trainer_core.model_dir import check_model_dir, find_model_dir
from trainer_core.progress import log

from . import FORMAT
from .asr_args import FRESH_LEARNING_RATE, ASRArguments
from .asr_model import build_model
from .asr_report import check_pipeline_loads, plot_curves, write_card
from .asr_splits import make_splits


def run(paths: Paths) -> dict:
    import torch

    from trainer_core.fit import Runtime

    from .ctc import Batcher, blank_collapse, evaluate, fingerprint, train, word_and_char_accuracy

    started = time.monotonic()
    # 1. Arguments and the machine.
    args = read_arguments(ASRArguments, paths)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    runtime = Runtime.choose(args.mixed_precision, paths.num_gpus, paths.num_cpus)
    job = paths.job()
    base_dir = find_model_dir(paths.base_model_dir)
    if base_dir is not None:
        check_model_dir(base_dir)  # before spending time on the data
    elif "learning_rate" not in args.given:
        args.learning_rate = FRESH_LEARNING_RATE  # a model from scratch takes larger steps than a fine-tune

    # 2. Data, decoded once.
    utts = load_job_data(paths, "text")

    # 3. Splits; overlong clips stay out of training only (they are still evaluated).
    splits = make_splits(utts, args)
    too_long = [u for u in splits.train if u.seconds > args.max_seconds]
    if too_long:
        splits.train = [u for u in splits.train if u.seconds <= args.max_seconds]
        splits.notes.append(f"{len(too_long)} training clips longer than max_seconds={args.max_seconds} left out "
                            f"(e.g. {too_long[0].where})")
        if not splits.train:
            raise TrainerError(f"Every training clip is longer than max_seconds={args.max_seconds}; raise it or cut the audio.")
    for note in splits.notes:
        log(note)
    log(f"splits: train {len(splits.train)}, validation {len(splits.validation)}, test {len(splits.test)}")

    # 4-5. Vocabulary and model.
    with tempfile.TemporaryDirectory() as tmp:
        built = build_model(base_dir, [u.text for u in splits.train], args, Path(tmp))
        vocab = built.processor.tokenizer.get_vocab()
        for note in built.notes:
            log(note)
        splits.notes += built.notes
        model = built.model
        n_params = sum(p.numel() for p in model.parameters())
        log(f"model: {model.config.model_type}, {n_params:,} parameters, vocabulary of {len(vocab)}"
            + (f", from the base in {base_dir}" if base_dir else ", fresh"))

        # 6. Training.
        freeze = {"auto": base_dir is not None, "true": True, "false": False}[args.freeze_feature_encoder.lower()]
        batcher = Batcher(built.processor, built.uppercase, args, runtime.device)
        state, run_plan = train(model, batcher, splits, args, runtime, paths.checkpoint_dir,
                                fingerprint(args, splits, vocab, base_dir), freeze)
        splits.notes += run_plan.notes
        train_seconds = time.monotonic() - started

        # 7. Evaluation of the weights kept (the best validation epoch's unless keep=last) on held-out data.
        eval_utts = splits.test if splits.eval_split == "test" else splits.validation
        result = evaluate(model, batcher, eval_utts, args.eval_batch_size, runtime)
        log(f"{splits.eval_split} ({len(eval_utts)} clips): WER {result['wer']:.4f}, CER {result['cer']:.4f}, "
            f"{result['empty']:.0%} transcribed as nothing")
        collapsed, warning = blank_collapse(result, splits.eval_split, args.on_blank_collapse)
        if collapsed:
            raise TrainerError(collapsed)
        scores = {**word_and_char_accuracy(result), "epochs_run": state.epoch, "best_epoch": state.best_epoch}

        # 7b. Learning curve: the same recipe (vocabulary, starting point, seed) on subsets of the
        # training split; each subset has its own checkpoint, so a rerun resumes.
        learning_curve = None
        if args.learning_curve:
            from trainer_core.learning_curve import parse_fractions, run_learning_curve

            def train_and_score(subset, tag):
                torch.manual_seed(args.seed)
                (Path(tmp) / tag).mkdir()
                sub = build_model(base_dir, [u.text for u in splits.train], args, Path(tmp) / tag)
                sub_splits = dataclasses.replace(splits, train=subset)
                sub_state, _ = train(sub.model, batcher, sub_splits, args, runtime, paths.checkpoint_dir / tag,
                                     fingerprint(args, sub_splits, vocab, base_dir) + tag, freeze)
                sub_result = evaluate(sub.model, batcher, eval_utts, args.eval_batch_size, runtime)
                return {**word_and_char_accuracy(sub_result), "epochs_run": sub_state.epoch,
                        "best_epoch": sub_state.best_epoch}

            paths.output_data_dir.mkdir(parents=True, exist_ok=True)
            learning_curve = run_learning_curve(
                train_clips=splits.train, full_point=scores, fractions=parse_fractions(args.learning_curve_fractions),
                metric=args.learning_curve_metric, target=args.target_metric or None, seed=args.seed,
                eval_split=splits.eval_split, eval_size=len(eval_utts), train_and_score=train_and_score,
                plot_path=paths.output_data_dir / "learning_curve.png",
                full_stopped_early=state.stop_reason.startswith("early stop"))

        # 8. The artifact.
        model_dir = paths.model_dir
        model_dir.mkdir(parents=True, exist_ok=True)
        model.to("cpu")
        lineage = list((built.base_info or {}).get("lineage", []))
        lineage.append({"job_id": job.get("job_id"), "model_name": job.get("model_name"),
                        "base": job.get("base") or ("uploaded model" if base_dir else None),
                        "base_version": job.get("base_version"), "train_size": len(splits.train)})
        # Our notes travel inside config.json, which every consumer of the directory already reads.
        model.config.retrain = {"format": FORMAT, "lineage": lineage, "uppercase": built.uppercase,
                                "chars_to_ignore": args.chars_to_ignore}
        model.config.architectures = [type(model).__name__]
        model.save_pretrained(str(model_dir), safe_serialization=True)
        built.processor.save_pretrained(str(model_dir))

    sample = eval_utts[0]
    via_pipeline = check_pipeline_loads(model_dir, sample.audio)
    log(f"pipeline check: {sample.path}: {via_pipeline!r}")

    out = paths.output_data_dir
    out.mkdir(parents=True, exist_ok=True)
    examples = [{"audio": u.path, "reference": ref, "prediction": hyp} for u, ref, hyp in result["pairs"][: args.num_examples]]
    metrics = {
        "wer": result["wer"],
        "cer": result["cer"],
        "eval_loss": result["loss"],
        "eval_split": splits.eval_split,
        "eval_size": len(eval_utts),
        "test_size": len(splits.test),
        "train_size": len(splits.train),
        "val_size": len(splits.validation),
        "train_seconds": round(sum(u.seconds for u in splits.train), 1),
        "best_epoch": state.best_epoch,
        "kept_epoch": state.kept_epoch,
        "epochs_run": state.epoch,
        "stop_reason": state.stop_reason,
        "empty_transcriptions": result["empty"],
        "warnings": [warning] if warning else [],
        "best_val_wer": state.best_record().get("val_wer"),
        "best_val_cer": state.best_record().get("val_cer"),
        "metric_for_best_model": args.metric_for_best_model,
        "initial_val_wer": state.initial.get("val_wer"),
        "initial_val_cer": state.initial.get("val_cer"),
        "vocab_size": len(vocab),
        "added_characters": built.added_chars,
        "base_model": base_dir is not None,
        "parameters": n_params,
        "training_seconds": round(train_seconds, 1),
        "examples": examples,
        **({"learning_curve": learning_curve} if learning_curve else {}),
        "history": state.history,
        "notes": splits.notes,
    }
    metrics = json.loads(json.dumps(metrics, default=str).replace("NaN", "null"))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_curves(state.history, state.best_epoch, out / "training_curves.png")
    shutil.copyfile(out / "training_curves.png", model_dir / "training_curves.png")
    if learning_curve:
        shutil.copyfile(out / "learning_curve.png", model_dir / "learning_curve.png")
    ordered_vocab = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    write_card(model_dir, job, metrics, args, lineage, splits.notes, ordered_vocab)
    log(f"done in {time.monotonic() - started:.1f}s: {sorted(p.name for p in model_dir.iterdir())}")
    return metrics


def main() -> int:
    return run_main(run, "ASR training")
