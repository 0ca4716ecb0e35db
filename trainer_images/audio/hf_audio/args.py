"""Hyperparameters of the Hugging Face fine-tuning method.

They arrive as strings (SageMaker's contract) and are parsed back to the type each field
declares, with the CNN trainer's parser, so "true", "3e-5" and "8" mean the same in both.
Unknown names are logged and ignored: the service may pass keys meant for another trainer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from audio_trainer.args import Paths, read_arguments
from audio_trainer.errors import TrainerError


@dataclass
class FineTuningArguments:
    """What the user may tune. Defaults follow Hugging Face's audio-classification example
    (3e-5, warm-up 10%, linear decay) scaled for the few hundred to few thousand clips users send."""

    # Optimisation
    epochs: int = field(default=10, metadata={"help": "maximum number of passes over the training split"})
    batch_size: int = field(default=8, metadata={"help": "clips per forward pass (per device)"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "forward passes per optimizer step"})
    learning_rate: float = field(default=3e-5, metadata={"help": "peak AdamW learning rate"})
    weight_decay: float = 0.01
    warmup_ratio: float = field(default=0.1, metadata={"help": "share of the optimizer steps spent warming up"})
    max_grad_norm: float = 1.0
    label_smoothing: float = 0.0
    seed: int = 0
    patience: int = field(default=3, metadata={"help": "epochs without validation-loss improvement before stopping"})
    min_delta: float = 1e-4

    # Model
    freeze_feature_encoder: bool = field(
        default=True, metadata={"help": "keep the convolutional feature encoder fixed (where the model has one)"}
    )
    freeze_base_model: bool = field(default=False, metadata={"help": "train only the classification head"})

    # Inputs
    max_length_seconds: float = field(
        default=10.0, metadata={"help": "training clips longer than this are randomly cropped to it"}
    )
    max_eval_length_seconds: float = field(default=30.0, metadata={"help": "evaluation clips are truncated to this"})
    bucket_batches: int = field(
        default=50, metadata={"help": "batches per length bucket: clips are sorted by duration within a bucket"}
    )

    # Splits, used when the CSV has no `split` column (or leaves rows unassigned)
    validation_fraction: float = 0.15
    test_fraction: float = 0.15

    # Runtime
    mixed_precision: str = field(default="auto", metadata={"help": "auto | bf16 | fp16 | no (GPU only)"})

    def validate(self) -> None:
        checks = [
            (self.epochs >= 1, "epochs must be at least 1"),
            (self.batch_size >= 1, "batch_size must be at least 1"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be at least 1"),
            (self.learning_rate > 0, "learning_rate must be positive"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (self.max_grad_norm > 0, "max_grad_norm must be positive"),
            (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            (self.patience >= 1, "patience must be at least 1"),
            (self.max_length_seconds > 0 and self.max_eval_length_seconds > 0, "max lengths must be positive"),
            (self.bucket_batches >= 1, "bucket_batches must be at least 1"),
            (0 < self.validation_fraction < 0.5, "validation_fraction must be between 0 and 0.5"),
            (0 <= self.test_fraction < 0.5, "test_fraction must be between 0 and 0.5"),
            (self.mixed_precision in ("auto", "bf16", "fp16", "no"), "mixed_precision must be auto, bf16, fp16 or no"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainerError(f"Invalid hyperparameter: {message}.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_hyperparameters(paths: Paths) -> FineTuningArguments:
    return read_arguments(FineTuningArguments, paths)
