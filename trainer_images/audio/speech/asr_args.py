"""Hyperparameters of the `asr` task. Every value arrives as a string and is parsed to its type
(trainer_core/args.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from trainer_core.args import FitArguments


@dataclass
class ASRArguments(FitArguments):
    """Hyperparameters of the `asr` task. Every value arrives as a string and is parsed to its type."""

    # Optimisation (the fit driver's fields are FitArguments'; these defaults are this task's)
    batch_size: int = 8
    learning_rate: float = field(default=3e-4, metadata={"help": "peak AdamW learning rate"})
    weight_decay: float = 0.005
    max_grad_norm: float = 1.0
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "batches per optimizer step"})
    warmup_fraction: float = field(default=0.1, metadata={"help": "share of the steps spent warming up"})
    metric_for_best_model: str = field(default="cer", metadata={"help": "cer | wer | loss: what chooses the best epoch"})
    learning_curve_metric: str = field(default="word_accuracy", metadata={
        "help": "word_accuracy (1 - WER) | char_accuracy (1 - CER): the score the learning curve fits"})

    LEARNING_CURVE_METRICS: ClassVar[tuple[str, ...]] = ("word_accuracy", "char_accuracy")

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
            (self.hidden_size % 4 == 0 and self.conv_channels >= 8, "hidden_size must be a multiple of 4, conv_channels at least 8"),
            (0 <= self.mask_time_prob < 1 and 0 <= self.dropout < 1, "mask_time_prob and dropout must be in [0, 1)"),
        ]
