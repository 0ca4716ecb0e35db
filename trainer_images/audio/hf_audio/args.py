"""Hyperparameters of the Hugging Face fine-tuning method.

They arrive as strings (SageMaker's contract) and are parsed back to the type each field
declares, with the parser every trainer shares (trainer_core/args.py), so "true", "3e-5" and "8" mean the same in both.
Unknown names are logged and ignored: the service may pass keys meant for another trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trainer_core.args import FitArguments, Paths, read_arguments


@dataclass
class FineTuningArguments(FitArguments):
    """What the user may tune. Defaults follow Hugging Face's audio-classification example
    (3e-5, warm-up 10%, linear decay) scaled for the few hundred to few thousand clips users send."""

    # Optimisation
    epochs: int = field(default=10, metadata={"help": "maximum number of passes over the training split"})
    batch_size: int = field(default=8, metadata={"help": "clips per forward pass (per device)"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "forward passes per optimizer step"})
    learning_rate: float = field(default=3e-5, metadata={"help": "peak AdamW learning rate"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "share of the optimizer steps spent warming up"})
    max_grad_norm: float = 1.0
    label_smoothing: float = 0.0
    patience: int = field(default=3, metadata={"help": "epochs without validation-loss improvement before stopping"})
    min_steps: int = field(default=200, metadata={"help": "optimizer steps before early stopping may end the run"})

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

    def checks(self) -> list[tuple[bool, str]]:
        return [
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be at least 1"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            (self.max_length_seconds > 0 and self.max_eval_length_seconds > 0, "max lengths must be positive"),
            (self.bucket_batches >= 1, "bucket_batches must be at least 1"),
        ]


def parse_hyperparameters(paths: Paths) -> FineTuningArguments:
    return read_arguments(FineTuningArguments, paths)
