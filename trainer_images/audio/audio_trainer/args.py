"""What the user may tune in the keyword CNN (`TrainingArguments`); the fields every trainer
shares, and how they are read, are trainer_core/args.py's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from trainer_core.args import FitArguments, Paths, read_arguments
from trainer_core.errors import TrainerError


@dataclass
class TrainingArguments(FitArguments):
    """Hyperparameters. Defaults suit a keyword-spotting set of a few hundred to a few thousand clips
    (the optimisation's, shared with the other trainers, are FitArguments')."""

    # Optimisation (a warm-up + cosine schedule), run to its end and its final weights kept:
    # validation is spoken by the training speakers, so it saturates long before the model stops
    # improving on speakers it never heard, and its best epoch is noise (bench/README.md, KWS out
    # of domain, 60 voices, seeds 0/1/2: 0.897/0.949/0.956 with the best epoch's weights,
    # 0.956/0.978/0.926 with the final ones of the same runs; 74 voices, final: 0.956/0.963/0.963).
    epochs: int = field(default=100, metadata={"help": "passes over the training split (may grow to make min_steps)"})
    keep: str = field(default="last", metadata={
        "help": "last: every epoch, then the final weights | best: the best validation epoch's, with early stopping"})
    patience: int = field(default=25, metadata={"help": "epochs without validation improvement before stopping (keep=best)"})
    warmup_fraction: float = field(default=0.1, metadata={"help": "share of the steps spent warming up"})
    label_smoothing: float = 0.1

    # Front end and model
    clip_seconds: float = field(
        default=0.0, metadata={"help": "training crop length; 0 = longest training clip (capped at 4 s)"}
    )
    n_mels: int = 40
    n_fft: int = 400  # 25 ms windows at 16 kHz
    hop_length: int = 160  # 10 ms hop
    architecture: str = field(default="cnn", metadata={"help": "cnn | bcresnet (model.py)"})
    channels: str = field(default="", metadata={
        "help": "stem width, then block widths, comma separated (default: cnn 32,32,64,128; bcresnet 48,24,36,48,60)"})
    dropout: float = 0.3
    feature_norm: str = field(default="utterance", metadata={"help": "utterance | channel: log-mel normalisation"})

    # Augmentation
    augment: bool = True
    speed_min: float = 0.7
    speed_max: float = 1.3
    gain_db: float = 12.0
    noise_probability: float = 0.8
    snr_min_db: float = 5.0
    snr_max_db: float = 35.0
    reverb_probability: float = field(default=0.5, metadata={"help": "share of examples in a synthetic room"})
    rt60_min: float = 0.1
    rt60_max: float = 0.6
    telephone_probability: float = field(default=0.2, metadata={"help": "share of examples band-limited to 300-3400 Hz"})
    vtlp_min: float = field(default=0.85, metadata={"help": "vocal-tract-length warp of the mel axis, lowest factor"})
    vtlp_max: float = 1.15
    mixup_alpha: float = field(default=0.4, metadata={"help": "Beta(alpha, alpha) mixup of example pairs (0 = off)"})
    time_masks: int = 2
    time_mask_fraction: float = 0.1
    freq_masks: int = 2
    freq_mask_bins: int = 6

    DEFAULT_CHANNELS: ClassVar[dict[str, str]] = {"cnn": "32,32,64,128", "bcresnet": "48,24,36,48,60"}

    @property
    def channel_list(self) -> list[int]:
        try:
            text = self.channels or self.DEFAULT_CHANNELS.get(self.architecture, "")
            widths = [int(c) for c in str(text).split(",") if c.strip()]
        except ValueError:
            widths = []
        if not widths or any(w <= 0 for w in widths):
            raise TrainerError(f"hyperparameter channels={self.channels!r}: expected positive integers like '32,64,128'")
        return widths

    def checks(self) -> list[tuple[bool, str]]:
        self.channel_list  # noqa: B018 - raises its own TrainerError
        return [
            (0 < self.speed_min <= self.speed_max, "speed_min must be positive and at most speed_max"),
            (0 <= self.reverb_probability <= 1 and 0 <= self.telephone_probability <= 1, "probabilities must be in [0, 1]"),
            (0 < self.rt60_min <= self.rt60_max <= 2, "need 0 < rt60_min <= rt60_max <= 2 seconds"),
            (0.5 <= self.vtlp_min <= self.vtlp_max <= 2, "need 0.5 <= vtlp_min <= vtlp_max <= 2"),
            (0 <= self.mixup_alpha <= 10, "mixup_alpha must be in [0, 10]"),
            (8 <= self.n_mels <= 256, "n_mels must be between 8 and 256"),
            (self.feature_norm in ("utterance", "channel"), "feature_norm must be utterance or channel"),
            (self.architecture in self.DEFAULT_CHANNELS, "architecture must be cnn or bcresnet"),
            (self.architecture != "bcresnet" or len(self.channel_list) == 5, "bcresnet takes 5 channel widths"),
            (self.hop_length >= 1 and self.n_fft >= self.hop_length, "need n_fft >= hop_length >= 1"),
        ]


def parse_hyperparameters(paths: Paths) -> TrainingArguments:
    return read_arguments(TrainingArguments, paths)
