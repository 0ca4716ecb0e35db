"""Task `asr`: CTC fine-tuning of a wav2vec2-style speech recogniser, step by step:

1. Read the paths (SM_* variables) and the hyperparameters (strings, parsed to their types).
2. Read dataset.csv (`audio,text[,split]`, and the validation channel's), decode every file once to
   16 kHz mono (video files through ffmpeg).
3. Split: honour the `split` column / validation channel, otherwise a seeded random split into
   train/validation/test. The test split never trains and never chooses an epoch.
4. Normalise the transcripts and build the character vocabulary from the training split; with a
   base model, merge it into the base's vocabulary (base ids kept, new characters appended).
5. The model: the base (`AutoModelForCTC`, safetensors only, no remote code) with its output layer
   resized to the merged vocabulary, or a fresh small `Wav2Vec2ForCTC` sized for a CPU.
6. Train with AdamW, linear warm-up and decay, length-bucketed batches, gradient accumulation and
   mixed precision on a GPU; WER/CER on validation every epoch; early stopping; a checkpoint every
   epoch so a rerun resumes.
7. Evaluate the best weights on the test split (validation when there is none): WER, CER, examples.
8. Save model + processor with save_pretrained (safetensors), check that
   `transformers.pipeline("automatic-speech-recognition", model=DIR)` loads it, write the curves,
   the model card and metrics.json.

Any failure writes a one-paragraph reason to $SM_OUTPUT_DIR/failure and exits non-zero.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from trainer_core.contract import run_main

from . import FORMAT, SAMPLE_RATE
from .common import (
    Paths,
    TrainerError,
    Utterance,
    check_model_dir_is_safe,
    emit_progress,
    find_model_dir,
    load_audio,
    log,
    parse_arguments,
    read_manifest,
)
from .vocab import BOS, DELIMITER, EOS, PAD, UNK, base_is_uppercase, characters, fresh_vocab, merge_vocab, normalise, write_vocab

CHECKPOINT_SUBDIR = "speech-asr"


@dataclass
class ASRArguments:
    """Hyperparameters of the `asr` task. Every value arrives as a string and is parsed to its type."""

    # Optimisation
    epochs: int = field(default=30, metadata={"help": "maximum passes over the training split"})
    batch_size: int = 8
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "batches per optimizer step"})
    learning_rate: float = field(default=3e-4, metadata={"help": "peak AdamW learning rate"})
    weight_decay: float = 0.005
    warmup_fraction: float = field(default=0.1, metadata={"help": "share of the steps spent warming up"})
    max_grad_norm: float = 1.0
    seed: int = 0
    patience: int = field(default=8, metadata={"help": "epochs without validation improvement before stopping"})
    metric_for_best_model: str = field(default="cer", metadata={"help": "cer | wer | loss: what chooses the best epoch"})
    min_delta: float = 1e-4

    # Splits, used when the CSV has no `split` column (or leaves rows unassigned)
    validation_fraction: float = 0.1
    test_fraction: float = 0.1

    # Text
    chars_to_ignore: str = field(default=',?.!;:"%()[]{}<>«»…', metadata={"help": "removed from transcripts"})

    # Audio
    max_seconds: float = field(default=20.0, metadata={"help": "longer training clips are left out (attention is quadratic)"})

    # The base model
    freeze_feature_encoder: str = field(default="auto", metadata={"help": "auto (freeze when a base is given) | true | false"})

    # A fresh model (no base): a small wav2vec2 a CPU trains in minutes
    hidden_size: int = 144
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    intermediate_size: int = 288
    conv_channels: int = 96
    dropout: float = 0.1
    mask_time_prob: float = field(default=0.05, metadata={"help": "SpecAugment-style time masking (0 = off)"})

    # Runtime and reporting
    mixed_precision: str = field(default="auto", metadata={"help": "auto | bf16 | fp16 | no (GPU only)"})
    eval_batch_size: int = 16
    num_examples: int = field(default=8, metadata={"help": "example transcriptions in metrics.json and the card"})

    def validate(self) -> None:
        checks = [
            (self.epochs >= 1, "epochs must be at least 1"),
            (self.batch_size >= 1 and self.eval_batch_size >= 1, "batch sizes must be at least 1"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be at least 1"),
            (self.learning_rate > 0, "learning_rate must be positive"),
            (self.patience >= 1, "patience must be at least 1"),
            (0 < self.validation_fraction < 0.5, "validation_fraction must be between 0 and 0.5"),
            (0 <= self.test_fraction < 0.5, "test_fraction must be between 0 and 0.5"),
            (self.max_seconds > 0, "max_seconds must be positive"),
            (self.freeze_feature_encoder.lower() in ("auto", "true", "false"), "freeze_feature_encoder must be auto, true or false"),
            (self.mixed_precision in ("auto", "bf16", "fp16", "no"), "mixed_precision must be auto, bf16, fp16 or no"),
            (self.metric_for_best_model in ("cer", "wer", "loss"), "metric_for_best_model must be cer, wer or loss"),
            (self.hidden_size % self.num_attention_heads == 0, "hidden_size must be a multiple of num_attention_heads"),
            (self.hidden_size % 4 == 0 and self.conv_channels >= 8, "hidden_size must be a multiple of 4, conv_channels at least 8"),
            (0 <= self.mask_time_prob < 1 and 0 <= self.dropout < 1, "mask_time_prob and dropout must be in [0, 1)"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainerError(f"Invalid hyperparameter: {message}.")


# ---------------------------------------------------------------------------------------------
# 3. Splits


@dataclass
class Splits:
    train: list[Utterance]
    validation: list[Utterance]
    test: list[Utterance]
    eval_split: str
    notes: list[str]


def make_splits(utts: list[Utterance], args: ASRArguments) -> Splits:
    """Given splits are kept; unassigned rows are shuffled with the seed and divided.

    A test split is carved out only when the train CSV's split column assigns nothing (a user who
    assigns only train/validation has chosen to have no test split; metrics are then reported on
    validation and metrics.json says so)."""
    rng = random.Random(args.seed)
    notes: list[str] = []
    train = [u for u in utts if u.split == "train"]
    validation = [u for u in utts if u.split == "validation"]
    test = [u for u in utts if u.split == "test"]
    pool = [u for u in utts if u.split == ""]
    rng.shuffle(pool)
    assigns = any(u.split for u in utts if u.source == "train")

    if not test and not assigns and args.test_fraction > 0:
        n = max(1, round(args.test_fraction * len(pool)))
        if len(pool) - n < 2:
            raise TrainerError(f"Only {len(utts)} transcribed clips: too few to hold out a test split and still train "
                               "and validate. Add recordings, or give a split column.")
        test, pool = pool[:n], pool[n:]
        notes.append(f"test split: {args.test_fraction:.0%} of the rows, chosen at random with seed {args.seed}")
    if not validation:
        source = pool if pool else train
        n = max(1, round(args.validation_fraction * len(source)))
        if len(source) - n < 1:
            raise TrainerError("Too few training clips to hold out a validation split; add recordings or give a split column.")
        if source is train:
            rng.shuffle(train)
            validation, train = train[:n], train[n:]
            notes.append(f"no validation rows given: {args.validation_fraction:.0%} of the train rows (seed {args.seed})")
        else:
            validation, pool = pool[:n], pool[n:]
            notes.append(f"validation split: {args.validation_fraction:.0%} of the unassigned rows (seed {args.seed})")
    train = train + pool
    if not train:
        raise TrainerError("The training split is empty: every row was assigned to validation or test.")
    eval_split = "test"
    if not test:
        eval_split = "validation"
        notes.append("no test split: the reported metrics are on the validation split, which also chose the best epoch")
    return Splits(train, validation, test, eval_split, notes)


def bucketed_batches(utts: list[Utterance], batch_size: int, rng: random.Random | None) -> list[list[Utterance]]:
    """Batches of similar length, so padding (and wasted compute) stays small.

    For training (`rng` given) the clips are shuffled, grouped into mega-batches of 50 batches,
    sorted by length inside each and cut into batches, whose order is shuffled again: every epoch
    sees different neighbours, yet each batch holds clips of nearly the same length (as
    transformers' LengthGroupedSampler does). For evaluation everything is simply sorted."""
    if rng is None:
        ordered = sorted(utts, key=lambda u: len(u.audio))
        return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    shuffled = list(utts)
    rng.shuffle(shuffled)
    mega = 50 * batch_size
    batches = []
    for start in range(0, len(shuffled), mega):
        group = sorted(shuffled[start : start + mega], key=lambda u: len(u.audio), reverse=True)
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches


# ---------------------------------------------------------------------------------------------
# 4-5. Vocabulary, processor, model


@dataclass
class Built:
    model: object
    processor: object
    uppercase: bool
    added_chars: list[str]
    base_info: dict | None  # model_type, vocab size, lineage of the base
    notes: list[str]


def _unsafe_load_kwargs() -> dict:
    # Never run code from a model directory, never reach a hub, never unpickle.
    return {"local_files_only": True, "trust_remote_code": False}


def build_model(base_dir: Path | None, train_texts_raw: list[str], args: ASRArguments, work: Path) -> Built:
    import torch
    from transformers import (
        AutoModelForCTC,
        Wav2Vec2Config,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2ForCTC,
        Wav2Vec2Processor,
    )

    notes: list[str] = []
    if base_dir is None:
        texts = [normalise(t, args.chars_to_ignore) for t in train_texts_raw]
        vocab = fresh_vocab(characters(texts))
        tokenizer = Wav2Vec2CTCTokenizer(str(write_vocab(vocab, work)), unk_token=UNK, pad_token=PAD, bos_token=BOS,
                                         eos_token=EOS, word_delimiter_token=DELIMITER)
        extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0,
                                             do_normalize=True, return_attention_mask=True)
        # A small wav2vec2: the standard 7-layer convolutional front end (320x down-sampling, one frame
        # per 20 ms) with narrow channels, and a shallow transformer. Layer norm in the front end
        # (not group norm) so padded batches with an attention mask give the same output as single clips.
        config = Wav2Vec2Config(
            vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
            hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
            num_attention_heads=args.num_attention_heads, intermediate_size=args.intermediate_size,
            conv_dim=(args.conv_channels,) * 7, conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_kernel=(10, 3, 3, 3, 3, 2, 2),
            feat_extract_norm="layer", do_stable_layer_norm=True,
            num_conv_pos_embeddings=32, num_conv_pos_embedding_groups=4,
            hidden_dropout=args.dropout, attention_dropout=args.dropout, activation_dropout=0.0,
            feat_proj_dropout=0.0, final_dropout=args.dropout, layerdrop=0.0,
            mask_time_prob=args.mask_time_prob, mask_time_length=5, mask_feature_prob=0.0,
            ctc_loss_reduction="mean", ctc_zero_infinity=True,
        )
        model = Wav2Vec2ForCTC(config)
        processor = Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer)
        return Built(model, processor, False, [], None, notes)

    # A base model: only data is read (config, safetensors, processor files).
    config_json = check_model_dir_is_safe(base_dir)
    try:
        base_tokenizer = Wav2Vec2CTCTokenizer.from_pretrained(str(base_dir), **_unsafe_load_kwargs())
    except (OSError, ValueError, TypeError):
        base_tokenizer = None  # a pretrained encoder without a CTC head: the vocabulary starts afresh
    if base_tokenizer is not None:
        base_vocab = base_tokenizer.get_vocab()
        uppercase = base_is_uppercase(base_vocab)
        delimiter = base_tokenizer.word_delimiter_token or DELIMITER
        unk, pad = base_tokenizer.unk_token or UNK, base_tokenizer.pad_token or PAD
        bos, eos = base_tokenizer.bos_token, base_tokenizer.eos_token
    else:
        notes.append("the base has no tokenizer (vocab.json): its output layer is replaced by a new one")
        base_vocab, uppercase, delimiter, unk, pad, bos, eos = {}, False, DELIMITER, UNK, PAD, BOS, EOS
    if uppercase:
        notes.append("the base model spells in capitals: transcripts are upper-cased to use its trained outputs")

    texts = [normalise(t, args.chars_to_ignore, uppercase) for t in train_texts_raw]
    chars = characters(texts)
    head_size = int(config_json.get("vocab_size", 0)) if base_tokenizer is not None else 0
    if base_vocab:
        vocab, added = merge_vocab(base_vocab, chars, delimiter, head_size)
    else:
        vocab, added = fresh_vocab(chars), []
    # Added tokens of the base tokenizer are already in get_vocab(); vocab.json gets them all.
    tokenizer = Wav2Vec2CTCTokenizer(str(write_vocab(vocab, work)), unk_token=unk, pad_token=pad, bos_token=bos,
                                     eos_token=eos, word_delimiter_token=delimiter)
    if (base_dir / "preprocessor_config.json").is_file():
        extractor = Wav2Vec2FeatureExtractor.from_pretrained(str(base_dir), **_unsafe_load_kwargs())
    else:
        extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0,
                                             do_normalize=True, return_attention_mask=True)
        notes.append("the base has no preprocessor_config.json: a standard wav2vec2 feature extractor is used")
    if extractor.sampling_rate != SAMPLE_RATE:
        raise TrainerError(f"The base model's feature extractor expects {extractor.sampling_rate} Hz audio; only "
                           f"{SAMPLE_RATE} Hz models are supported.")
    try:
        model = AutoModelForCTC.from_pretrained(
            str(base_dir), use_safetensors=True, ctc_loss_reduction="mean", ctc_zero_infinity=True,
            pad_token_id=tokenizer.pad_token_id, **_unsafe_load_kwargs(),
        )
    except (ValueError, OSError, KeyError) as e:
        raise TrainerError(f"The base model ({config_json.get('model_type')}) cannot be loaded as a CTC speech model: "
                           f"{str(e).splitlines()[0][:300]}") from None

    # The output layer: one row per vocabulary id. Rows of the base's ids are kept; rows of new
    # characters start small and random, as a fresh head would.
    size = max(len(tokenizer), max(vocab.values()) + 1)
    old = model.lm_head
    new = torch.nn.Linear(old.in_features, size)
    with torch.no_grad():
        new.weight.normal_(0.0, model.config.initializer_range)
        new.bias.zero_()
        if base_tokenizer is not None:
            keep = min(old.out_features, size)
            new.weight[:keep] = old.weight[:keep]
            new.bias[:keep] = old.bias[:keep]
    model.lm_head = new
    model.config.vocab_size = size
    processor = Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer)
    base_info = {
        "model_type": config_json.get("model_type"),
        "base_vocab_size": len(base_vocab),
        "lineage": (config_json.get("retrain") or {}).get("lineage", []),
    }
    if added:
        notes.append(f"characters added to the base vocabulary: {''.join(added)!r}")
    return Built(model, processor, uppercase, added, base_info, notes)


# ---------------------------------------------------------------------------------------------
# 6-7. Training and evaluation


@dataclass
class TrainState:
    epoch: int = 0
    step: int = 0
    best: list | None = None  # validation figures of the best epoch, in the order of _score
    best_epoch: int = 0
    bad_epochs: int = 0
    finished: bool = False
    stop_reason: str = ""
    history: list[dict] = field(default_factory=list)
    initial: dict = field(default_factory=dict)  # validation metrics of the untrained model


def _score(v: dict, metric: str) -> tuple:
    """The validation figures in the order that chooses the best epoch: the chosen metric, then the
    others as tie-breakers.

    CER is the default: a character CTC model is trained on characters, and on a small validation
    set CER moves smoothly where WER jumps. WER also misleads early on: a model that emits nothing
    scores WER 1.0, one that already spells half of each word ("two th") scores above 1.0 through
    insertions, yet is much closer (its CER is lower). The tie-breakers keep early stopping from
    ending training while a fresh model sits on the all-blank plateau and only its loss moves."""
    order = {"cer": ("cer", "wer", "loss"), "wer": ("wer", "cer", "loss"), "loss": ("loss", "cer", "wer")}[metric]
    return tuple(v[k] if math.isfinite(v[k]) else math.inf for k in order)


def _better(new: tuple, best: tuple | None, delta: float) -> bool:
    """Lexicographic comparison with a tolerance."""
    if best is None:
        return True
    for a, b in zip(new, best):
        if a < b - delta:
            return True
        if a > b + delta:
            return False
    return False


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

    def text(self, u: Utterance) -> str:
        return normalise(u.text, self.chars_to_ignore, self.uppercase)

    def inputs(self, utts: list[Utterance]) -> dict:
        feats = self.extractor([u.audio for u in utts], sampling_rate=SAMPLE_RATE, padding=True,
                               return_attention_mask=self.use_mask, return_tensors="pt")
        out = {"input_values": feats["input_values"].to(self.device)}
        if self.use_mask:
            out["attention_mask"] = feats["attention_mask"].to(self.device)
        return out

    def labels(self, utts: list[Utterance]):
        enc = self.tokenizer([self.text(u) for u in utts], padding=True, return_attention_mask=True, return_tensors="pt")
        return enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100).to(self.device)


def evaluate(model, batcher: Batcher, utts: list[Utterance], batch_size: int, runtime) -> dict:
    """Greedy CTC decoding; corpus WER and CER (jiwer) on the normalised transcripts, mean loss."""
    import jiwer
    import torch

    model.eval()
    refs, hyps, order = [], [], []
    loss_sum, loss_n = 0.0, 0
    with torch.no_grad():
        for batch in bucketed_batches(utts, batch_size, None):
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
        "pairs": [(u, ref, hyp) for u, ref, hyp in zip(order, refs, hyps)],
    }


def _fingerprint(args: ASRArguments, splits: Splits, vocab: dict, base_dir: Path | None) -> str:
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


class Checkpoints:
    """$SM_CHECKPOINT_DIR/speech-asr: the latest weights and optimizer state, the best weights and the
    training state. Weights are safetensors; the optimizer state holds only tensors and numbers and is
    read with weights_only=True, so resuming never unpickles code. Written atomically (tmp + rename)."""

    def __init__(self, root: Path, fingerprint: str):
        self.dir = root / CHECKPOINT_SUBDIR
        self.fingerprint = fingerprint

    def load(self, model, optimizer, scheduler, scaler) -> tuple[TrainState, dict | None] | None:
        import torch
        from safetensors.torch import load_file, load_model

        state_file = self.dir / "state.json"
        if not state_file.is_file():
            return None
        try:
            saved = json.loads(state_file.read_text())
            if saved.get("fingerprint") != self.fingerprint:
                log("a checkpoint from a different job or configuration is ignored")
                return None
            load_model(model, str(self.dir / "last.safetensors"))
            extra = torch.load(self.dir / "optimizer.pt", map_location="cpu", weights_only=True)
            optimizer.load_state_dict(extra["optimizer"])
            scheduler.load_state_dict(extra["scheduler"])
            if scaler is not None and extra.get("scaler"):
                scaler.load_state_dict(extra["scaler"])
            best = load_file(str(self.dir / "best.safetensors")) if (self.dir / "best.safetensors").is_file() else None
            return TrainState(**saved["state"]), best
        except Exception as e:  # noqa: BLE001 - a damaged checkpoint means training starts afresh
            log(f"the checkpoint could not be resumed ({type(e).__name__}: {e}); training starts afresh")
            return None

    def save(self, model, optimizer, scheduler, scaler, state: TrainState, best_improved: bool) -> None:
        import torch
        from safetensors.torch import save_model

        self.dir.mkdir(parents=True, exist_ok=True)

        def atomic(name: str, write) -> None:
            tmp = self.dir / f".{name}.tmp"
            write(tmp)
            os.replace(tmp, self.dir / name)

        atomic("last.safetensors", lambda p: save_model(model, str(p)))
        if best_improved:
            shutil.copyfile(self.dir / "last.safetensors", self.dir / ".best.tmp")
            os.replace(self.dir / ".best.tmp", self.dir / "best.safetensors")
        extra = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else {}}
        atomic("optimizer.pt", lambda p: torch.save(extra, p))
        payload = {"fingerprint": self.fingerprint, "state": asdict(state)}
        atomic("state.json", lambda p: p.write_text(json.dumps(payload)))


def train(model, batcher: Batcher, splits: Splits, args: ASRArguments, runtime, checkpoints: Checkpoints,
          freeze: bool) -> TrainState:
    import torch

    if freeze and hasattr(model, "freeze_feature_encoder"):
        # The convolutional front end of a pretrained model already extracts good features; with
        # little data, training it only adds noise (the wav2vec2 paper freezes it when fine-tuning).
        model.freeze_feature_encoder()
    model.to(runtime.device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # biases and norms are not decayed
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.learning_rate)
    batches_per_epoch = math.ceil(len(splits.train) / args.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    total = max(1, steps_per_epoch * args.epochs)
    warmup = max(1, int(args.warmup_fraction * total))

    def lr_lambda(step: int) -> float:  # linear warm-up, then linear decay to zero
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    # fp16 needs loss scaling against underflow; bf16 has float32's range and does not.
    scaler = torch.amp.GradScaler("cuda") if runtime.amp_dtype == torch.float16 else None

    state, best_weights = TrainState(), None
    resumed = checkpoints.load(model, optimizer, scheduler, scaler)
    if resumed is not None:
        state, best_state = resumed
        best_weights = best_state
        log(f"resumed from the checkpoint after epoch {state.epoch} (step {state.step})")
    else:
        # The untrained model's validation figures: the baseline that training must beat.
        v = evaluate(model, batcher, splits.validation, args.eval_batch_size, runtime)
        state.initial = {"val_loss": v["loss"], "val_wer": v["wer"], "val_cer": v["cer"]}
        log(f"before training: validation WER {v['wer']:.3f}, CER {v['cer']:.3f}, loss {v['loss']:.3f}")

    while not state.finished and state.epoch < args.epochs:
        epoch = state.epoch + 1
        started = time.monotonic()
        rng = random.Random(f"{args.seed}:{epoch}")
        batches = bucketed_batches(splits.train, args.batch_size, rng)
        loss_sum, loss_n = 0.0, 0
        optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(batches):
            inputs = batcher.inputs(batch)
            with runtime.autocast():
                out = model(**inputs, labels=batcher.labels(batch))
            loss = out.loss / args.gradient_accumulation_steps
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
            if torch.isfinite(out.loss):
                loss_sum += float(out.loss.detach()) * len(batch)
                loss_n += len(batch)
            if (i + 1) % args.gradient_accumulation_steps == 0 or i + 1 == len(batches):
                if scaler is not None:
                    scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                state.step += 1

        v = evaluate(model, batcher, splits.validation, args.eval_batch_size, runtime)
        state.epoch = epoch
        record = {"epoch": epoch, "train_loss": loss_sum / loss_n if loss_n else float("nan"),
                  "val_loss": v["loss"], "val_wer": v["wer"], "val_cer": v["cer"],
                  "seconds": round(time.monotonic() - started, 1)}
        state.history.append(record)
        score = _score(v, args.metric_for_best_model)
        improved = _better(score, tuple(state.best) if state.best else None, args.min_delta)
        if improved:
            state.best, state.best_epoch, state.bad_epochs = list(score), epoch, 0
            best_weights = {k: t.detach().to("cpu", copy=True) for k, t in model.state_dict().items()}
        else:
            state.bad_epochs += 1
        if state.bad_epochs >= args.patience:
            state.finished, state.stop_reason = True, f"early stopping: no validation improvement in {args.patience} epochs"
        elif epoch >= args.epochs:
            state.finished, state.stop_reason = True, f"reached epochs={args.epochs}"
        emit_progress(epoch, args.epochs, state.step, {k: record[k] for k in ("train_loss", "val_loss", "val_wer", "val_cer")})
        example = v["pairs"][0] if v["pairs"] else None
        log(f"epoch {epoch}: train loss {record['train_loss']:.3f}, val loss {v['loss']:.3f}, WER {v['wer']:.3f}, "
            f"CER {v['cer']:.3f} ({record['seconds']}s)" + (f"; e.g. {example[1]!r} -> {example[2]!r}" if example else ""))
        checkpoints.save(model, optimizer, scheduler, scaler, state, improved)

    if best_weights is not None:
        model.load_state_dict(best_weights)
    return state


# ---------------------------------------------------------------------------------------------
# 8. Outputs


def plot_curves(history: list[dict], best_epoch: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], label="validation")
    ax_loss.set(title="CTC loss", xlabel="epoch")
    ax_err.plot(epochs, [h["val_wer"] for h in history], label="validation WER")
    ax_err.plot(epochs, [h["val_cer"] for h in history], label="validation CER")
    ax_err.set(title="Validation error rates", xlabel="epoch", ylim=(0, max(1.05, *[h["val_wer"] for h in history])))
    for ax in (ax_loss, ax_err):
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch ({best_epoch})")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_card(model_dir: Path, job: dict, metrics: dict, args: ASRArguments, lineage: list, notes: list[str],
               vocab: list[str]) -> None:
    name = job.get("model_name") or "asr-model"
    lines = [
        f"# {name}", "",
        "A CTC speech recogniser (wav2vec2-style) trained by the retrain service, task `asr`.", "",
        "```python", "from transformers import pipeline",
        'asr = pipeline("automatic-speech-recognition", model="path/to/this/directory")',
        'print(asr("recording.wav")["text"])', "```", "",
        "## Evaluation", "",
        f"Reported on the **{metrics['eval_split']}** split ({metrics['eval_size']} clips, never used for training"
        + (" or choosing the epoch" if metrics["eval_split"] == "test" else "") + "), greedy CTC decoding, "
        "transcripts normalised (case, ignored punctuation, whitespace).", "",
        "| metric | value |", "|---|---|",
        f"| WER | {metrics['wer']:.4f} |", f"| CER | {metrics['cer']:.4f} |",
        f"| untrained model, validation WER / CER | {metrics['initial_val_wer']} / {metrics['initial_val_cer']} |",
        "",
        "## Data", "",
        f"train {metrics['train_size']} clips ({metrics['train_seconds']:.0f} s), validation {metrics['val_size']}, "
        f"test {metrics['test_size']}.", "",
        *[f"- {n}" for n in notes], "",
        "## Training", "",
        f"best epoch {metrics['best_epoch']} of {metrics['epochs_run']} run ({metrics['stop_reason']}); "
        f"{metrics['training_seconds']:.0f} s.", "",
        f"Vocabulary ({len(vocab)} tokens): `{' '.join(vocab)}`", "",
        "Hyperparameters:", "", "```json", json.dumps(asdict(args), indent=1), "```", "",
        "## Examples", "", "| reference | transcription |", "|---|---|",
        *[f"| {e['reference']} | {e['prediction']} |" for e in metrics["examples"]], "",
        "## Lineage", "",
        *[f"- job {s.get('job_id')}: model {s.get('model_name')}, base {json.dumps(s.get('base'))}, "
          f"{s.get('train_size')} training clips" for s in lineage], "",
    ]
    (model_dir / "README.md").write_text("\n".join(lines))


def check_pipeline_loads(model_dir: Path, clip: np.ndarray) -> str:
    """The artifact's promise: the standard pipeline loads it with nothing of ours."""
    from transformers import pipeline

    try:
        asr = pipeline("automatic-speech-recognition", model=str(model_dir), device="cpu")
        return asr({"raw": clip, "sampling_rate": SAMPLE_RATE})["text"]
    except Exception as e:  # noqa: BLE001
        raise TrainerError(f"The saved model does not load with transformers.pipeline: {type(e).__name__}: {e}") from None


def run(paths: Paths) -> dict:
    import torch

    from audio_trainer.loop import Runtime

    started = time.monotonic()
    # 1. Arguments and the machine.
    args = parse_arguments(ASRArguments, paths)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    runtime = Runtime.choose(args, paths.num_gpus, paths.num_cpus)
    job = paths.job()
    base_dir = find_model_dir(paths.base_model_dir)
    if base_dir is not None:
        check_model_dir_is_safe(base_dir)  # before spending time on the data

    # 2. Data, decoded once.
    utts = read_manifest(paths.train_dir, "train", need_text=True)
    channels = {"train": paths.train_dir}
    if paths.validation_dir is not None:
        for u in (val := read_manifest(paths.validation_dir, "validation", need_text=True)):
            u.split = "validation"
        utts += val
        channels["validation"] = paths.validation_dir
    load_audio(utts, channels, workers=max(2, os.cpu_count() or 1))
    log(f"decoded {len(utts)} files ({sum(u.seconds for u in utts):.1f} s of audio) in {time.monotonic() - started:.1f}s")

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
        batcher = Batcher(built.processor, built.uppercase, args.chars_to_ignore, runtime.device)
        checkpoints = Checkpoints(paths.checkpoint_dir, _fingerprint(args, splits, vocab, base_dir))
        state = train(model, batcher, splits, args, runtime, checkpoints, freeze)
        train_seconds = time.monotonic() - started

        # 7. Evaluation of the best weights on held-out data.
        eval_utts = splits.test if splits.eval_split == "test" else splits.validation
        result = evaluate(model, batcher, eval_utts, args.eval_batch_size, runtime)
        log(f"{splits.eval_split} ({len(eval_utts)} clips): WER {result['wer']:.4f}, CER {result['cer']:.4f}")

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
        "epochs_run": state.epoch,
        "stop_reason": state.stop_reason,
        "best_val_wer": next((h["val_wer"] for h in state.history if h["epoch"] == state.best_epoch), None),
        "best_val_cer": next((h["val_cer"] for h in state.history if h["epoch"] == state.best_epoch), None),
        "metric_for_best_model": args.metric_for_best_model,
        "initial_val_wer": state.initial.get("val_wer"),
        "initial_val_cer": state.initial.get("val_cer"),
        "vocab_size": len(vocab),
        "added_characters": built.added_chars,
        "base_model": base_dir is not None,
        "parameters": n_params,
        "training_seconds": round(train_seconds, 1),
        "examples": examples,
        "history": state.history,
        "notes": splits.notes,
    }
    metrics = json.loads(json.dumps(metrics, default=str).replace("NaN", "null"))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_curves(state.history, state.best_epoch, out / "training_curves.png")
    shutil.copyfile(out / "training_curves.png", model_dir / "training_curves.png")
    ordered_vocab = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    write_card(model_dir, job, metrics, args, lineage, splits.notes, ordered_vocab)
    log(f"done in {time.monotonic() - started:.1f}s: {sorted(p.name for p in model_dir.iterdir())}")
    return metrics


def main() -> int:
    return run_main(run, "ASR training")
