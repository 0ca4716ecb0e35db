"""Hyperparameters of the `asr` task. Every value arrives as a string and is parsed to its type
(trainer_core/args.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from trainer_core.args import FitArguments

FRESH_LEARNING_RATE = 2e-3  # a fresh conformer from scratch (bench/quality.py's ASR row)


@dataclass
class ASRArguments(FitArguments):
    """Hyperparameters of the `asr` task. Every value arrives as a string and is parsed to its type."""

    # Optimisation (the fit driver's fields are FitArguments'; these defaults are this task's)
    batch_size: int = 8
    epochs: int = 40
    patience: int = 12
    learning_rate: float = field(default=3e-4, metadata={
        "help": f"peak AdamW learning rate (unset: 3e-4 with a base model, {FRESH_LEARNING_RATE:g} for a fresh one)"})
    weight_decay: float = 0.005
    max_grad_norm: float = 1.0
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "batches per optimizer step"})
    warmup_fraction: float = field(default=0.1, metadata={"help": "share of the steps spent warming up"})
    metric_for_best_model: str = field(default="loss", metadata={"help": "loss | cer | wer: what chooses the best epoch"})
    learning_curve_metric: str = field(default="word_accuracy", metadata={
        "help": "word_accuracy (1 - WER) | char_accuracy (1 - CER): the score the learning curve fits"})

    LEARNING_CURVE_METRICS: ClassVar[tuple[str, ...]] = ("word_accuracy", "char_accuracy")

    # Text
    chars_to_ignore: str = field(default=',?.!;:"%()[]{}<>«»…', metadata={"help": "removed from transcripts"})

    # Audio
    max_seconds: float = field(default=20.0, metadata={"help": "longer training clips are left out (attention is quadratic)"})

    # The base model
    freeze_feature_encoder: str = field(default="auto", metadata={"help": "auto (freeze when a base is given) | true | false"})

    # Augmentation (training split only)
    clean_fraction: float = field(default=0.25, metadata={
        "help": "share of the epochs trained on the clips as they are before augmentation starts (ctc.py)"})
    speed_factors: str = field(default="0.9,1.0,1.1", metadata={
        "help": "speed perturbation: each epoch every clip is heard at one of these speeds (Ko et al., 2015's "
                "three-way perturbation; 1.0 = off)"})
    vtlp_min: float = field(default=0.9, metadata={"help": "log-mel models: vocal-tract-length warp, lowest factor"})
    vtlp_max: float = 1.1
    time_masks: int = field(default=2, metadata={"help": "log-mel models: SpecAugment time masks per clip"})
    time_mask_fraction: float = 0.05
    freq_masks: int = field(default=2, metadata={"help": "log-mel models: SpecAugment frequency masks per clip"})
    freq_mask_bins: int = 10
    mask_time_prob: float = field(default=0.05, metadata={
        "help": "a base model's own time masking of its hidden states (unset: the base's config; 0 = off)"})

    # A fresh model (no base): log-mel input, a conformer encoder (Wav2Vec2BertForCTC), CTC
    frame_stack: int = field(default=4, metadata={
        "help": "10 ms log-mel frames stacked into one encoder frame (4: one output per 40 ms, as conformers subsample)"})
    hidden_size: int = 144
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 576
    conv_kernel: int = field(default=15, metadata={"help": "the conformer's depthwise convolution, in frames (odd)"})
    dropout: float = 0.1

    # Reporting
    eval_batch_size: int = 16
    num_examples: int = field(default=8, metadata={"help": "example transcriptions in metrics.json and the card"})
    on_blank_collapse: str = field(default="fail", metadata={
        "help": "fail | warn: a model that transcribes the held-out clips as nothing fails the job, or is "
                "stored with the warning in its metrics and card"})

    def checks(self) -> list[tuple[bool, str]]:
        return [
            (self.eval_batch_size >= 1, "eval_batch_size must be at least 1"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be at least 1"),
            (self.max_seconds > 0, "max_seconds must be positive"),
            (self.freeze_feature_encoder.lower() in ("auto", "true", "false"), "freeze_feature_encoder must be auto, true or false"),
            (self.metric_for_best_model in ("cer", "wer", "loss"), "metric_for_best_model must be cer, wer or loss"),
            (self.on_blank_collapse in ("fail", "warn"), "on_blank_collapse must be fail or warn"),
            (self.hidden_size % self.num_attention_heads == 0, "hidden_size must be a multiple of num_attention_heads"),
            (self.conv_kernel >= 3 and self.conv_kernel % 2 == 1, "conv_kernel must be odd and at least 3"),
            (1 <= self.frame_stack <= 8, "frame_stack must be between 1 and 8"),
            (bool(self.speed_list()) and all(0.5 <= f <= 2 for f in self.speed_list()),
             "speed_factors must be numbers between 0.5 and 2, comma separated"),
            (0.5 <= self.vtlp_min <= self.vtlp_max <= 2, "need 0.5 <= vtlp_min <= vtlp_max <= 2"),
            (min(self.time_masks, self.freq_masks, self.freq_mask_bins) >= 0 and 0 <= self.time_mask_fraction < 0.5,
             "time_masks, freq_masks and freq_mask_bins must be 0 or more, time_mask_fraction in [0, 0.5)"),
            (0 <= self.clean_fraction <= 1, "clean_fraction must be between 0 and 1"),
            (0 <= self.mask_time_prob < 1 and 0 <= self.dropout < 1, "mask_time_prob and dropout must be in [0, 1)"),
        ]

    def speed_list(self) -> list[float]:
        try:
            return [float(f) for f in self.speed_factors.split(",") if f.strip()]
        except ValueError:
            return []
