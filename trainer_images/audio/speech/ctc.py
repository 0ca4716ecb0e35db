"""Training and evaluating the CTC recogniser: the fit driver (trainer_core/fit.py) with this
recipe: length-bucketed batches of augmented clips (after the first clean epochs), the model's CTC
loss, greedy decoding on validation every epoch, validation loss (then CER, then WER) choosing the
best epoch, AdamW with linear warm-up and decay.

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

import numpy as np
import torch

from trainer_core.augment import spec_augment, speed, warp_mel_axis
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
MEMO_BYTES = 2 << 30  # training features kept in memory across epochs (beyond: computed each time)


class Batcher:
    """Waveforms -> model inputs, as the ASR pipeline makes them; transcripts -> label ids (-100 on
    padding, which CTC ignores). Training inputs are augmented: each clip at its epoch's speed,
    and for a log-mel model a vocal-tract-length warp and SpecAugment masks on the features."""

    def __init__(self, processor, uppercase: bool, args: ASRArguments, device):
        self.processor = processor
        self.extractor = processor.feature_extractor
        self.tokenizer = processor.tokenizer
        self.uppercase = uppercase
        self.args = args
        self.device = device
        self.use_mask = bool(getattr(self.extractor, "return_attention_mask", True))
        self.input_name = self.extractor.model_input_names[0]  # input_values (waveform) | input_features (log-mel)
        self.log_mel = self.input_name == "input_features"
        self.memo: dict[tuple[int, float], np.ndarray] = {}  # (clip, speed) -> features
        self.memo_bytes = 0

    def text(self, u: Clip) -> str:
        return normalise(u.text, self.args.chars_to_ignore, self.uppercase)

    def _encode(self, waves: list[np.ndarray]) -> dict:
        feats = self.extractor(waves, sampling_rate=SAMPLE_RATE, padding=True, return_attention_mask=self.use_mask,
                               return_tensors="pt")
        out = {self.input_name: feats[self.input_name].to(self.device)}
        if self.use_mask:
            out["attention_mask"] = feats["attention_mask"].to(self.device)
        return out

    def inputs(self, utts: list[Clip]) -> dict:
        """The clips as they are, for evaluation: made as training makes them (each clip's features
        on their own, memoised, then padded with the extractor's padding value)."""
        return self.train_inputs(utts, [1.0] * len(utts), None, augment=False)

    def train_inputs(self, utts: list[Clip], speeds: list[float], gen: torch.Generator | None,
                     augment: bool = True) -> dict:
        if not self.log_mel:
            return self._encode([speed(u.audio, f) for u, f in zip(utts, speeds)])
        feats = [self._features(u, f) for u, f in zip(utts, speeds)]
        frames = max(len(f) for f in feats)
        x = np.full((len(feats), frames, feats[0].shape[1]), self.extractor.padding_value, dtype=np.float32)
        mask = np.zeros((len(feats), frames), dtype=np.int64)
        for i, f in enumerate(feats):
            x[i, : len(f)] = f
            mask[i, : len(f)] = 1
        x = torch.from_numpy(x)
        out = {self.input_name: (self._augment(x, gen) if augment else x).to(self.device)}
        if self.use_mask:
            out["attention_mask"] = torch.from_numpy(mask).to(self.device)
        return out

    def _features(self, u: Clip, factor: float) -> np.ndarray:
        """One clip's log-mels at one speed; kept for the next epochs while they fit in MEMO_BYTES."""
        key = (id(u), factor)
        if key in self.memo:
            return self.memo[key]
        f = self.extractor(speed(u.audio, factor), sampling_rate=SAMPLE_RATE, return_tensors="np")[self.input_name][0]
        if self.memo_bytes + f.nbytes <= MEMO_BYTES:
            self.memo[key] = f
            self.memo_bytes += f.nbytes
        return f

    def _augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """VTLP and SpecAugment on [B, T, stride * mels] (each row `stride` stacked 10 ms frames)."""
        a, (b, t, width) = self.args, x.shape
        stride = getattr(self.extractor, "stride", 1)
        mels = x.reshape(b, t * stride, width // stride).transpose(1, 2)[:, None]  # [B, 1, mels, frames]
        mels = warp_mel_axis(mels, a.vtlp_min, a.vtlp_max, gen)
        mels = spec_augment(mels, a.freq_masks, a.freq_mask_bins, a.time_masks, a.time_mask_fraction, gen)
        return mels[:, 0].transpose(1, 2).reshape(b, t, width)

    def labels(self, utts: list[Clip]):
        enc = self.tokenizer([self.text(u) for u in utts], padding=True, return_attention_mask=True, return_tensors="pt")
        return enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100).to(self.device)


def evaluate(model, batcher: Batcher, utts: list[Clip], batch_size: int, runtime) -> dict:
    """Greedy CTC decoding; corpus WER and CER (jiwer) on the normalised transcripts, mean loss, and
    the share of clips with speech transcribed as nothing (`empty`: CTC's blank collapse)."""
    import jiwer
    import torch

    model.eval()
    refs, hyps, silent, order = [], [], [], []
    special = set(batcher.tokenizer.all_special_ids)
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
            # Each clip's own frames only: the outputs over a shorter clip's padding were never
            # trained, and decoded they add letters (seen: "one nine" -> "one nineine").
            lengths = output_lengths(model, inputs, ids.shape[1])
            ids = [row[:n].tolist() for row, n in zip(ids, lengths)]
            texts = greedy_text(batcher.tokenizer, ids)
            hyps += texts
            # Nothing but blanks and special tokens (<s>, <unk>, ...) is nothing said.
            silent += [not text or all(i in special for i in row) for row, text in zip(ids, texts)]
            refs += [batcher.text(u) for u in batch]
            order += batch
    model.train()
    scored = [(r, h, s) for r, h, s in zip(refs, hyps, silent) if r]  # jiwer needs non-empty references
    r, h = [s[0] for s in scored], [s[1] for s in scored]
    return {
        "loss": loss_sum / loss_n if loss_n else float("nan"),
        "wer": float(jiwer.wer(r, h)) if r else float("nan"),
        "cer": float(jiwer.cer(r, h)) if r else float("nan"),
        "empty": sum(s[2] for s in scored) / len(scored) if scored else float("nan"),
        "pairs": [(u, ref, hyp) for u, ref, hyp in zip(order, refs, hyps)],
    }


def greedy_text(tokenizer, ids: list[list[int]]) -> list[str]:
    """Each clip's best path as text, as the ASR pipeline decodes a CTC model's output (it passes
    skip_special_tokens=False): repeats merged first, then blanks dropped. With
    skip_special_tokens=True the blank (the pad token) goes first and a doubled letter merges
    (seen: "three" -> "thre", test WER 0.19 where the pipeline made 0.06 of the same model)."""
    return [" ".join(h.split()) for h in tokenizer.batch_decode(ids, skip_special_tokens=False)]


def output_lengths(model, inputs: dict, frames: int) -> list[int]:
    """The number of output frames of each clip of a padded batch."""
    mask = inputs.get("attention_mask")
    if mask is None or not hasattr(model, "_get_feat_extract_output_lengths"):
        return [frames] * len(next(iter(inputs.values())))
    return [min(frames, int(n)) for n in model._get_feat_extract_output_lengths(mask.sum(-1).cpu())]


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
    """`clean_epochs` first epochs on the clips as they are, then augmented ones: a fresh CTC model
    first has to find the alignment of letters to sound, and augmented from its first step it stayed
    far longer on the plateau where it emits each letter's prior (seen: a fresh conformer on 320
    digit strings, train loss stuck at 1.9 after 16 epochs with augmentation, 0.1 by epoch 8 without)."""

    def __init__(self, model, batcher: Batcher, splits: Splits, args: ASRArguments, runtime: Runtime,
                 clean_epochs: int):
        self.model, self.batcher, self.splits, self.args, self.runtime = model, batcher, splits, args, runtime
        self.clean_epochs = clean_epochs

    def batches(self, epoch: int, generator: torch.Generator):
        train = self.splits.train
        augment = epoch > self.clean_epochs
        speeds = self.args.speed_list() if augment else [1.0]
        for idx in length_buckets([len(u.audio) for u in train], self.args.batch_size, BUCKET_BATCHES, generator):
            picks = torch.randint(0, len(speeds), (len(idx),), generator=generator).tolist()
            yield [train[i] for i in idx], [speeds[p] for p in picks], generator, augment

    def loss(self, batch):
        clips, speeds, generator, augment = batch
        inputs = self.batcher.train_inputs(clips, speeds, generator, augment)
        with self.runtime.autocast():
            out = self.model(**inputs, labels=self.batcher.labels(clips))
        return out.loss, len(clips)

    def validate(self) -> dict[str, float]:
        v = evaluate(self.model, self.batcher, self.splits.validation, self.args.eval_batch_size, self.runtime)
        if v["pairs"]:
            _, ref, hyp = v["pairs"][0]
            log(f"validation: WER {v['wer']:.3f}, CER {v['cer']:.3f}, {v['empty']:.0%} empty; e.g. {ref!r} -> {hyp!r}")
        return {"val_loss": v["loss"], "val_wer": v["wer"], "val_cer": v["cer"], "val_empty": v["empty"]}

    def score(self, figures: dict[str, float]) -> tuple[float, ...]:
        """The chosen metric, then the others as tie-breakers.

        Validation loss is the default: on a small validation split (24 clips, say) WER and CER
        jump by whole words from epoch to epoch, and early stopping on them ended a fresh model's
        run at epoch 18 with a best epoch 10 while its loss was still falling (test WER 0.42; on
        loss the same run went on to epoch 27 and WER 0.27). It also moves while a fresh model
        sits on the all-blank plateau, where WER stays 1.0. WER misleads early on in another way:
        a model that emits nothing scores 1.0, one that already spells half of each word
        ("two th") above 1.0 through insertions, yet is much closer."""
        return tuple(figures[k] for k in SCORE_ORDER[self.args.metric_for_best_model])


def train(model, batcher: Batcher, splits: Splits, args: ASRArguments, runtime: Runtime, checkpoint_dir: Path,
          fingerprint: str, freeze: bool) -> tuple[TrainState, Plan]:
    """Train `model` in place; on return it holds the weights `args.keep` names (fit.Plan)."""
    if freeze and hasattr(model, "freeze_feature_encoder"):
        # The convolutional front end of a pretrained model already extracts good features; with
        # little data, training it only adds noise (the wav2vec2 paper freezes it when fine-tuning).
        model.freeze_feature_encoder()
    accumulation = args.gradient_accumulation_steps
    run = plan(epochs=args.epochs, epochs_given="epochs" in args.given,
               steps_per_epoch=math.ceil(math.ceil(len(splits.train) / args.batch_size) / accumulation),
               batch_size=args.batch_size, patience=args.patience, min_delta=args.min_delta,
               min_steps=args.min_steps, max_grad_norm=args.max_grad_norm, accumulation=accumulation, keep=args.keep)
    recipe = CTCRecipe(model, batcher, splits, args, runtime, clean_epochs=int(args.clean_fraction * run.epochs))
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
