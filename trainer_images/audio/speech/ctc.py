"""Training and evaluating the CTC recogniser: the fit driver (trainer_core/fit.py) with this
recipe: length-bucketed batches, the model's CTC loss, greedy decoding on validation every epoch,
CER (then WER, then loss) choosing the best epoch, AdamW with linear warm-up and decay.

A CTC model can learn to emit only blanks (the loss falls fastest that way at first, and a fresh
model or a poor base can stay there; seen: a fresh wav2vec2 on 400 digit strings, WER 1.0 from
epoch 2, and the job "succeeded"). `blank_collapse` says when the held-out transcriptions are
(nearly) all empty: the run fails with that reason rather than ship a model that hears nothing,
or, with on_blank_collapse=warn, the model is stored with the warning in its metrics and card.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict
from pathlib import Path

import torch

from trainer_core.batching import length_buckets, sorted_batches
from trainer_core.fit import Checkpoint, Plan, Recipe, Runtime, TrainState, adamw, fit, linear_schedule, plan
from trainer_core.progress import log
from trainer_core.manifest import Clip

from . import SAMPLE_RATE
from .asr_args import ASRArguments
from .asr_splits import Splits
from .vocab import normalise

CHECKPOINT_NAME = "speech-asr-checkpoint.pt"
BUCKET_BATCHES = 50  # batches per length bucket (as transformers' LengthGroupedSampler's mega-batches)
COLLAPSED = 0.9  # share of held-out clips transcribed as nothing that is a collapse, not a weak model
MOSTLY_EMPTY = 0.3  # ... that deserves a warning


class Batcher:
    """Waveforms -> model inputs; transcripts -> label ids (-100 on padding, which CTC ignores)."""

    def __init__(self, processor, uppercase: bool, chars_to_ignore: str, device):
        self.processor = processor
        self.extractor = processor.feature_extractor
        self.tokenizer = processor.tokenizer
        self.uppercase = uppercase
        self.chars_to_ignore = chars_to_ignore
        self.device = device
        self.use_mask = bool(getattr(self.extractor, "return_attention_mask", True))

    def text(self, u: Clip) -> str:
        return normalise(u.text, self.chars_to_ignore, self.uppercase)

    def inputs(self, utts: list[Clip]) -> dict:
        feats = self.extractor([u.audio for u in utts], sampling_rate=SAMPLE_RATE, padding=True,
                               return_attention_mask=self.use_mask, return_tensors="pt")
        out = {"input_values": feats["input_values"].to(self.device)}
        if self.use_mask:
            out["attention_mask"] = feats["attention_mask"].to(self.device)
        return out

    def labels(self, utts: list[Clip]):
        enc = self.tokenizer([self.text(u) for u in utts], padding=True, return_attention_mask=True, return_tensors="pt")
        return enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100).to(self.device)


def evaluate(model, batcher: Batcher, utts: list[Clip], batch_size: int, runtime) -> dict:
    """Greedy CTC decoding; corpus WER and CER (jiwer) on the normalised transcripts, mean loss, and
    the share of clips with speech transcribed as nothing (`empty`: CTC's blank collapse)."""
    import jiwer
    import torch

    model.eval()
    refs, hyps, order = [], [], []
    loss_sum, loss_n = 0.0, 0
    with torch.no_grad():
        for batch in [[utts[i] for i in idx] for idx in sorted_batches([len(u.audio) for u in utts], batch_size)]:
            inputs = batcher.inputs(batch)
            with runtime.autocast():
                out = model(**inputs, labels=batcher.labels(batch))
            if out.loss is not None and torch.isfinite(out.loss):
                loss_sum += float(out.loss) * len(batch)
                loss_n += len(batch)
            ids = out.logits.float().argmax(-1).cpu()
            # As the ASR pipeline decodes: repeats merged, blanks dropped, and no special tokens
            # (<s>, </s>, <unk>) in the text.
            hyps += [" ".join(h.split()) for h in batcher.tokenizer.batch_decode(ids, skip_special_tokens=True)]
            refs += [batcher.text(u) for u in batch]
            order += batch
    model.train()
    scored = [(r, h) for r, h in zip(refs, hyps) if r]  # jiwer needs non-empty references
    r, h = [s[0] for s in scored], [s[1] for s in scored]
    return {
        "loss": loss_sum / loss_n if loss_n else float("nan"),
        "wer": float(jiwer.wer(r, h)) if r else float("nan"),
        "cer": float(jiwer.cer(r, h)) if r else float("nan"),
        "empty": sum(not hyp for hyp in h) / len(h) if h else float("nan"),
        "pairs": [(u, ref, hyp) for u, ref, hyp in zip(order, refs, hyps)],
    }


def fingerprint(args: ASRArguments, splits: Splits, vocab: dict, base_dir: Path | None) -> str:
    """What a checkpoint must match to be resumed: hyperparameters, data and splits, vocabulary, base."""
    h = hashlib.sha256()
    h.update(json.dumps(asdict(args), sort_keys=True).encode())
    h.update(json.dumps(vocab, sort_keys=True).encode())
    for name in ("train", "validation"):
        for u in getattr(splits, name):
            h.update(f"{name}|{u.source}|{u.path}|{u.text}|{len(u.audio)}\n".encode())
    if base_dir is not None:
        h.update((base_dir / "config.json").read_bytes())
    return h.hexdigest()


SCORE_ORDER = {"cer": ("val_cer", "val_wer", "val_loss"), "wer": ("val_wer", "val_cer", "val_loss"),
               "loss": ("val_loss", "val_cer", "val_wer")}


class CTCRecipe(Recipe):
    def __init__(self, model, batcher: Batcher, splits: Splits, args: ASRArguments, runtime: Runtime):
        self.model, self.batcher, self.splits, self.args, self.runtime = model, batcher, splits, args, runtime

    def batches(self, epoch: int, generator: torch.Generator):
        train = self.splits.train
        for idx in length_buckets([len(u.audio) for u in train], self.args.batch_size, BUCKET_BATCHES, generator):
            yield [train[i] for i in idx]

    def loss(self, batch: list[Clip]):
        inputs = self.batcher.inputs(batch)
        with self.runtime.autocast():
            out = self.model(**inputs, labels=self.batcher.labels(batch))
        return out.loss, len(batch)

    def validate(self) -> dict[str, float]:
        v = evaluate(self.model, self.batcher, self.splits.validation, self.args.eval_batch_size, self.runtime)
        if v["pairs"]:
            _, ref, hyp = v["pairs"][0]
            log(f"validation: WER {v['wer']:.3f}, CER {v['cer']:.3f}, {v['empty']:.0%} empty; e.g. {ref!r} -> {hyp!r}")
        return {"val_loss": v["loss"], "val_wer": v["wer"], "val_cer": v["cer"], "val_empty": v["empty"]}

    def score(self, figures: dict[str, float]) -> tuple[float, ...]:
        """The chosen metric, then the others as tie-breakers.

        CER is the default: a character CTC model is trained on characters, and on a small
        validation set CER moves smoothly where WER jumps. WER also misleads early on: a model that
        emits nothing scores WER 1.0, one that already spells half of each word ("two th") scores
        above 1.0 through insertions, yet is much closer (its CER is lower). The tie-breakers keep
        early stopping from ending training while a fresh model sits on the all-blank plateau and
        only its loss moves."""
        return tuple(figures[k] for k in SCORE_ORDER[self.args.metric_for_best_model])


def train(model, batcher: Batcher, splits: Splits, args: ASRArguments, runtime: Runtime, checkpoint_dir: Path,
          fingerprint: str, freeze: bool) -> tuple[TrainState, Plan]:
    """Train `model` in place; on return it holds the weights of the best validation score."""
    if freeze and hasattr(model, "freeze_feature_encoder"):
        # The convolutional front end of a pretrained model already extracts good features; with
        # little data, training it only adds noise (the wav2vec2 paper freezes it when fine-tuning).
        model.freeze_feature_encoder()
    recipe = CTCRecipe(model, batcher, splits, args, runtime)
    accumulation = args.gradient_accumulation_steps
    run = plan(epochs=args.epochs, epochs_given="epochs" in args.given,
               steps_per_epoch=math.ceil(math.ceil(len(splits.train) / args.batch_size) / accumulation),
               batch_size=args.batch_size, patience=args.patience, min_delta=args.min_delta,
               min_steps=args.min_steps, max_grad_norm=args.max_grad_norm, accumulation=accumulation)
    model.to(runtime.device)
    optimizer = adamw(model, args.learning_rate, args.weight_decay)
    state = fit(model, recipe, optimizer, linear_schedule(args.learning_rate, args.warmup_fraction, run.total_steps),
                run, runtime, Checkpoint(checkpoint_dir / CHECKPOINT_NAME, fingerprint), args.seed)
    return state, run


def blank_collapse(result: dict, split: str, on_collapse: str) -> tuple[str | None, str | None]:
    """(failure reason, warning) from the held-out evaluation's share of empty transcriptions."""
    empty = result["empty"]
    if not math.isfinite(empty):
        return None, None
    share = f"{empty:.0%} of the {split} clips ({len(result['pairs'])}) are transcribed as nothing"
    if empty >= COLLAPSED:
        reason = (f"The model collapsed to blanks: {share} (WER {result['wer']:.2f}), so it would ship as a model "
                  "that hears no speech. A fresh model needs more recordings or epochs (or a higher learning_rate "
                  "with a longer warm-up); a base model that does this was not trained for this audio.")
        if on_collapse == "warn":
            return None, reason + " Stored anyway (on_blank_collapse=warn)."
        return reason + " Set on_blank_collapse=warn to store such a model anyway.", None
    if empty >= MOSTLY_EMPTY:
        return None, f"{share}: the model often hears no speech; more data or epochs should help"
    return None, None


def word_and_char_accuracy(result: dict) -> dict[str, float]:
    """1 - WER and 1 - CER, clipped at 0: the higher-is-better scores a learning curve fits."""
    return {"word_accuracy": max(0.0, 1.0 - result["wer"]), "char_accuracy": max(0.0, 1.0 - result["cer"]),
            "wer": result["wer"], "cer": result["cer"]}
